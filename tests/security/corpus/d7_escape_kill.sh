# Attack: survive the sandbox's end: setsid, double fork, nohup, ignore SIGTERM/SIGHUP.
setsid sh -c 'trap "" TERM HUP; while :; do sleep 1; done' </dev/null >/dev/null 2>&1 &
( nohup sh -c 'trap "" TERM HUP INT; sleep 1000' >/dev/null 2>&1 & ) &
python3 -c '
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(1000)
' &
sleep 0.5
echo planted
