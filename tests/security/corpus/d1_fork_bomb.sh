# Attack: fork bomb. The pids cgroup limit must stop it inside the sandbox while the host stays
# responsive; the timeout then kills it all.
bomb() { bomb | bomb & }
bomb
exec sleep 30
