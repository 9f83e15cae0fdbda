#!/bin/sh
# vmsnap fsfreeze-hook dispatcher: qemu-ga runs it with "freeze" before freezing and "thaw" after thawing.
#
# Runs the executable files in $VMSNAP_HOOK_DIR (default /etc/qemu/fsfreeze-hook.d) with the same argument:
# in name order on freeze, in reverse order on thaw. Unlike Debian's stock hook it FAILS the freeze when a
# script fails: the scripts already run are thawed (reverse order) and the exit status is non-zero, so
# qemu-ga refuses to freeze and the backup stops. On thaw every script runs; a failure is logged and
# reported through the exit status. Each step is appended to $VMSNAP_HOOK_LOG with the script's output.
# A script that runs past $VMSNAP_HOOK_TIMEOUT seconds (default 60) is killed and counts as failed.
# POSIX sh only: the guest may have nothing but dash or busybox.

set -u
LC_ALL=C
export LC_ALL
hook_dir=${VMSNAP_HOOK_DIR:-/etc/qemu/fsfreeze-hook.d}
log_file=${VMSNAP_HOOK_LOG:-/var/log/vmsnap-fsfreeze-hook.log}
timeout_s=${VMSNAP_HOOK_TIMEOUT:-60}
action=${1:-}

log() {
    printf '%s vmsnap-fsfreeze-hook[%s]: %s\n' "$(date '+%Y-%m-%dT%H:%M:%S')" "$$" "$*" >>"$log_file" 2>/dev/null
}

# the hook scripts, one per line, in name order (the glob sorts in the C locale)
list_scripts() {
    for script in "$hook_dir"/*; do
        [ -f "$script" ] && [ -x "$script" ] && printf '%s\n' "$script"
    done
    return 0
}

reverse_lines() {
    sed -n '1!G;h;$p'
}

run_one() {  # run_one SCRIPT ACTION: runs it, logs the outcome and its output, returns its status
    if command -v timeout >/dev/null 2>&1; then
        timeout "$timeout_s" "$1" "$2" >>"$log_file" 2>&1 </dev/null
    else
        "$1" "$2" >>"$log_file" 2>&1 </dev/null
    fi
    status=$?
    if [ "$status" -eq 0 ]; then
        log "$2 $1: ok"
    else
        log "$2 $1: FAILED with exit status $status"
    fi
    return "$status"
}

mkdir -p "$(dirname "$log_file")" 2>/dev/null

case "$action" in
    freeze)
        log "freeze: start"
        done_list=""
        scripts=$(list_scripts)
        old_ifs=$IFS
        IFS='
'
        for script in $scripts; do
            IFS=$old_ifs
            if run_one "$script" freeze; then
                done_list="$script
$done_list"
            else
                # $status was set by run_one (sh functions share variables with their caller)
                failed_status=$status
                log "freeze: aborted by $script; thawing the scripts already run"
                IFS='
'
                for ran in $done_list; do
                    IFS=$old_ifs
                    run_one "$ran" thaw || true
                done
                IFS=$old_ifs
                log "freeze: failed"
                echo "vmsnap-fsfreeze-hook: $script failed on freeze (exit $failed_status)" >&2
                exit 1
            fi
        done
        IFS=$old_ifs
        log "freeze: done"
        exit 0
        ;;
    thaw)
        log "thaw: start"
        failed=0
        scripts=$(list_scripts | reverse_lines)
        old_ifs=$IFS
        IFS='
'
        for script in $scripts; do
            IFS=$old_ifs
            run_one "$script" thaw || failed=1
        done
        IFS=$old_ifs
        if [ "$failed" -ne 0 ]; then
            log "thaw: done, with failures"
            exit 1
        fi
        log "thaw: done"
        exit 0
        ;;
    *)
        echo "usage: $0 freeze|thaw" >&2
        exit 2
        ;;
esac
