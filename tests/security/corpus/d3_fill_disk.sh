# Attack: fill the disk and the inode table (ENOSPC must come from the sandbox's own quota, never
# the host's disk). Each step prints what it met.
err=$(dd if=/dev/zero of=/tmp/fill bs=1M count=4096 2>&1 >/dev/null)
echo "tmp fill: exit $? $(echo "$err" | grep -o 'No space left on device' | head -n 1)"
echo "tmp filled MiB: $(($(stat -c %s /tmp/fill) / 1048576))"
err=$(dd if=/dev/zero of=/dev/shm/fill bs=1M count=4096 2>&1 >/dev/null)
echo "shm fill: exit $? $(echo "$err" | grep -o 'No space left on device' | head -n 1)"
rm -f /tmp/fill /dev/shm/fill
mkdir /home/user/many
i=0
while [ $i -lt 200000 ]; do
  { true > /home/user/many/f$i; } 2>/dev/null || break
  i=$((i+1))
done
echo "files created: $i"
err=$( (true > /home/user/many/one-more) 2>&1)
echo "one more file: $(echo "$err" | grep -o 'No space left on device' | head -n 1)"
rm -rf /home/user/many
err=$(truncate -s 1P /tmp/sparse 2>&1) && echo "sparse: created" || echo "sparse: refused: $err"
