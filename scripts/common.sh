# Shared by scripts/test and scripts/reproduce. Source it; do not run it.

BLOCKLAB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BLOCKLAB_VENV:-$BLOCKLAB_ROOT/notebooks/.venv}"

log() { printf '\n==> %s\n' "$*" >&2; }

# Installs the Debian packages the tests and experiments need (fio, ZooKeeper), as root.
ensure_system_packages() {
  local need=()
  command -v fio >/dev/null 2>&1 || need+=(fio)
  [ -x /usr/share/zookeeper/bin/zkServer.sh ] || need+=(zookeeper)
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${need[*]} (install them as root: apt-get install ${need[*]})" >&2
    return 1
  fi
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}

# Creates the notebooks' virtual environment and installs the exact versions of
# notebooks/requirements.lock into it (again only when the lock changed);
# notebooks/requirements.txt lists what the lock was resolved from.
ensure_venv() {
  local req="$BLOCKLAB_ROOT/notebooks/requirements.lock" stamp="$VENV/.requirements.sha256"
  local sum; sum="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]; then
    return 0
  fi
  log "creating the notebook environment in $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet -r "$req"
  echo "$sum" > "$stamp"
}

# Every experiment binary: experiments/src/bin/exp-*.rs, in a fixed order.
experiments() {
  local f
  for f in "$BLOCKLAB_ROOT"/experiments/src/bin/exp-*.rs; do
    [ -e "$f" ] || continue
    basename "$f" .rs
  done | sort
}

# Runs notebook NAME.ipynb on the run directory RUN: figures go to RUN/figures and the
# executed notebook to RUN/notebooks (FIGURES and EXECUTED override them, e.g. to try a
# notebook on results/example without writing into it).
# Usage: run_notebook NAME RUN [FIGURES EXECUTED]. Fails when the notebook fails or writes
# no figure named NAME*.
run_notebook() {
  local name="$1" run figures executed
  run="$(realpath "${2:?run_notebook needs a run directory}")"
  figures="$(realpath -m "${3:-$run/figures}")"
  executed="$(realpath -m "${4:-$run/notebooks}")"
  local nb="$BLOCKLAB_ROOT/notebooks/$name.ipynb"
  [ -f "$nb" ] || { echo "no notebook for $name" >&2; return 0; }
  mkdir -p "$figures" "$executed"
  log "notebook $name"
  BLOCKLAB_RESULTS="$run" BLOCKLAB_FIGURES="$figures" MPLBACKEND=Agg \
    "$VENV/bin/jupyter" nbconvert --to notebook --execute --ExecutePreprocessor.timeout=600 \
    --output-dir "$executed" "$nb" >/dev/null
  if ! compgen -G "$figures/$name*" >/dev/null; then
    echo "notebook $name wrote no figure into $figures" >&2
    return 1
  fi
}

# The newest run under results/ (notebooks/blocklab_nb.py's latest_run, the one rule).
latest_run() {
  "$VENV/bin/python" "$BLOCKLAB_ROOT/notebooks/blocklab_nb.py" latest "$@"
}
