#!/bin/sh
# sudo in a moat sandbox (the host template's /usr/local/bin/sudo).
#
# No process in a sandbox can change its user: user processes have no capabilities and run
# with no_new_privs, so a setuid sudo could not work. Root (a command started as root through
# the API) runs the command as it is; any other user is told how to run it as root instead.
while [ $# -gt 0 ]; do
    case "$1" in
        -u | --user)
            [ $# -ge 2 ] || { echo "sudo: option '$1' requires an argument" >&2; exit 1; }
            target=$2
            shift 2 ;;
        -u*) target=${1#-u}; shift ;;
        --user=*) target=${1#--user=}; shift ;;
        -i | --login) login=1; shift ;;
        -s | --shell) shell=1; shift ;;
        -E | -H | -n | -S | -k | -P | --preserve-env | --preserve-env=* | --set-home | \
            --non-interactive | --stdin | --reset-timestamp) shift ;;
        --) shift; break ;;
        -*) echo "sudo: option '$1' is not supported in a moat sandbox" >&2; exit 1 ;;
        *) break ;;
    esac
done
case ${target:-root} in
    root | 0 | '#0') ;;
    *) echo "sudo: only root can be a target in a moat sandbox, not '$target'" >&2; exit 1 ;;
esac
if [ "$(id -u)" != 0 ]; then
    echo "sudo: $(id -un) cannot become root inside a moat sandbox (no process here can change its user); run the command as root from outside: commands.run(cmd, user=\"root\") with the E2B SDKs, or moat sandbox exec --root" >&2
    exit 1
fi
if [ -n "$login$shell" ]; then
    if [ $# -eq 0 ]; then exec /bin/bash ${login:+-l}; fi
    exec /bin/bash ${login:+-l} -c "$*"
fi
if [ $# -eq 0 ]; then
    echo "usage: sudo [-E] [-u root] command [argument ...]" >&2
    exit 1
fi
exec "$@"
