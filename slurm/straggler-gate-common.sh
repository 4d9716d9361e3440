# Shared by straggler-prolog and straggler-healthcheck (sourced, not run): find the settings, run
# `straggler gate` with a hard outer timeout, log its lines. Copy all three files into one directory
# (e.g. /etc/slurm/). Settings: straggler-gate.env in that directory, else next to slurm.conf, else
# /etc/slurm/straggler-gate.env (shell assignments, all optional):
#   STRAGGLER=/opt/straggler/bin/straggler   the straggler command [default: straggler on PATH]
#   STRAGGLER_GATE_BUDGET=30                 seconds the gate may take (--budget)
#   STRAGGLER_GATE_ON_ERROR=pass             what "could not decide" does: pass | fail | drain
#   STRAGGLER_GATE_ARGS="--collector http://collector:8080"   more gate options
#   STRAGGLER_GATE_LOG=/var/log/straggler-gate.log   where the gate's lines go [default: syslog via logger]
#   SLURM_CONF=/etc/slurm/slurm.conf         for scontrol, where slurm.conf is not in its default place
#                                            (slurmd gives a health check no SLURM_CONF)
# Slurm runs prologs and health checks with an almost empty environment: PATH is set here.

here=$(cd "$(dirname "$0")" && pwd)
for f in "$here/straggler-gate.env" "$(dirname "${SLURM_CONF:-/etc/slurm/slurm.conf}")/straggler-gate.env" \
         /etc/slurm/straggler-gate.env; do
  if [ -r "$f" ]; then . "$f"; break; fi
done
PATH=${STRAGGLER_PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}
export PATH
if [ -n "${SLURM_CONF:-}" ]; then export SLURM_CONF; fi
STRAGGLER=${STRAGGLER:-straggler}
STRAGGLER_GATE_BUDGET=${STRAGGLER_GATE_BUDGET:-30}
STRAGGLER_GATE_ON_ERROR=${STRAGGLER_GATE_ON_ERROR:-pass}
node=${SLURMD_NODENAME:-$(hostname -s)}

log() {
  if [ -n "${STRAGGLER_GATE_LOG:-}" ]; then
    printf '%s %s[%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$1" "${SLURM_JOB_ID:--}" "$2" >> "$STRAGGLER_GATE_LOG"
  elif command -v logger >/dev/null 2>&1; then
    logger -t "straggler-$1" -- "$2"
  fi
}

# run_gate MODE: runs the gate (which drains this node itself on a failure) and sets $rc to the
# scheduler's answer: 0 the node may run jobs, 1 it may not. The outer timeout is a second net:
# the gate ends itself at its budget.
run_gate() {
  mode=$1
  out=$(timeout --kill-after=5 "$((${STRAGGLER_GATE_BUDGET%.*} + 10))" \
        "$STRAGGLER" gate --budget "$STRAGGLER_GATE_BUDGET" --on-error "$STRAGGLER_GATE_ON_ERROR" \
        --drain --node "$node" $STRAGGLER_GATE_ARGS 2>&1)
  rc=$?
  printf '%s\n' "$out" | while IFS= read -r line; do log "$mode" "$line"; done
  case $rc in
    0) ;;
    1)  # the collector's circuit breaker refused to drain this node (too many nodes failing at once:
        # a fleet problem, not this node's): it stays in service and runs the job; the alert is raised
      if printf '%s\n' "$out" | grep -q "^drain: refused by the collector's circuit breaker"; then
        log "$mode" "the collector's circuit breaker refused the drain: $node stays in service and runs the job"
        rc=0
      fi ;;
    *)  # the gate itself could not run (not installed, crashed, killed): could not check is not unhealthy
      log "$mode" "straggler gate could not run (exit code $rc); --on-error $STRAGGLER_GATE_ON_ERROR"
      case $STRAGGLER_GATE_ON_ERROR in
        pass) rc=0 ;;
        drain) scontrol update nodename="$node" state=drain reason="straggler: gate could not run ($rc)" ; rc=1 ;;
        *) rc=1 ;;
      esac ;;
  esac
}
