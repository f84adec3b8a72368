# Attack: fill the disk and the inode table (ENOSPC must come from the sandbox's own quota, never
# the host's disk).
dd if=/dev/zero of=/tmp/fill bs=1M count=4096 2>&1 | tail -n 1
echo "tmp fill: $?"
dd if=/dev/zero of=/dev/shm/fill bs=1M count=4096 2>&1 | tail -n 1
i=0
while [ $i -lt 200000 ]; do touch /home/user/f$i 2>/dev/null || break; i=$((i+1)); done
echo "files created: $i"
truncate -s 1P /tmp/sparse 2>&1 && echo "sparse: created" || echo "sparse: refused"
