# I3: open pseudo-terminals until refused. Every devpts instance but the host's draws from one
# host-wide pool, so an unbounded sandbox takes the others' terminals.
import os

held = []
err = None
while len(held) < 5000:
    try:
        held.append(os.openpty())
    except OSError as e:
        err = e
        break
print("ptys", len(held))
print("refused", err)
