# Attack: kill or stop the agent (PID 1) and every process, as the sandbox's root; then prove the
# sandbox still answers by finishing normally.
import os
import signal

for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGSEGV):
    try:
        os.kill(1, sig)
        print(f"kill(1, {sig.name}): sent")
    except OSError as e:
        print(f"kill(1, {sig.name}): errno {e.errno}")
try:
    with open("/proc/1/mem", "rb") as f:
        print("agent memory: READABLE")
except OSError as e:
    print(f"agent memory: denied errno {e.errno}")
try:
    os.listdir("/proc/1/root")
    print("agent root: listable")
except OSError as e:
    print(f"agent root: denied errno {e.errno}")
print("still here")
