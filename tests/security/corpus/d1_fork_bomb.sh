# Attack: fork bomb. The pids cgroup limit must stop it inside the sandbox while the host stays
# responsive; the timeout then kills it all. The bomb starts with one fork of this shell (a
# background job), so this shell itself never meets the limit and `exec sleep` holds the
# command open until the timeout.
bomb() { bomb | bomb & }
bomb &
exec sleep 30
