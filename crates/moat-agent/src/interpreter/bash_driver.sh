# moat's code-interpreter driver for bash.
#
# The agent starts it as `bash --noprofile --norc -c <this text> moat-bash <command fd> <event fd>`.
# Each command is one line of bash that the agent generates from quoted literals only:
#   __moat_code=$'...'; __moat_env=($'NAME' $'VALUE' ...)
# The code runs in this shell, so `cd`, variables and functions persist between executions; the
# private pipes are closed around it (bash keeps close-on-exec copies to restore them), so the
# code's child processes do not inherit them. A failing status becomes an "error" frame; a "done"
# frame follows each run.
__moat_in=$1
__moat_out=$2
set --
__moat_busy=
# SIGINT from the agent ends the running code (by returning from __moat_run) but not the shell.
# The trap is set again before every run: after a `return` out of it while bash waited for a
# child, bash would not run it a second time.
__moat_trap() {
    trap 'if [[ -n $__moat_busy ]]; then return 130; fi' INT
}

__moat_run() {
    eval "$__moat_code"
}

printf '{"type":"ready"}\n' >&"$__moat_out"
while :; do
    IFS= read -r -u "$__moat_in" __moat_line
    __moat_rc=$?
    # Above 128: a signal interrupted the wait for a command; keep waiting.
    if ((__moat_rc > 128)); then continue; fi
    # End of file: the agent is gone.
    if ((__moat_rc != 0)); then exit 0; fi
    __moat_code=
    __moat_env=()
    eval "$__moat_line"
    __moat_saved=()
    for ((__moat_i = 0; __moat_i < ${#__moat_env[@]}; __moat_i += 2)); do
        __moat_name=${__moat_env[__moat_i]}
        if [[ -v $__moat_name ]]; then
            __moat_saved+=("$__moat_name" set "${!__moat_name}")
        else
            __moat_saved+=("$__moat_name" unset "")
        fi
        export "$__moat_name=${__moat_env[__moat_i + 1]}"
    done
    __moat_trap
    __moat_busy=1
    eval "__moat_run $__moat_in<&- $__moat_out>&-"
    __moat_status=$?
    __moat_busy=
    # The env_vars of the request apply to this execution only.
    for ((__moat_i = 0; __moat_i < ${#__moat_saved[@]}; __moat_i += 3)); do
        __moat_name=${__moat_saved[__moat_i]}
        if [[ ${__moat_saved[__moat_i + 1]} == set ]]; then
            export "$__moat_name=${__moat_saved[__moat_i + 2]}"
        else
            unset "$__moat_name"
        fi
    done
    # A failing last command is the execution's error, as in Jupyter's bash kernel.
    if ((__moat_status != 0)); then
        printf '{"type":"error","name":"ExitCode","value":"%d","traceback":"the last command exited with status %d"}\n' \
            "$__moat_status" "$__moat_status" >&"$__moat_out"
    fi
    printf '{"type":"done"}\n' >&"$__moat_out"
done
