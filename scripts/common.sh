# Shared by scripts/test and scripts/reproduce. Source it; do not run it.

BLOCKLAB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BLOCKLAB_VENV:-$BLOCKLAB_ROOT/notebooks/.venv}"

log() { printf '\n==> %s\n' "$*" >&2; }

# The Debian packages the tests and experiments need, each known by one program it installs.
SYSTEM_PACKAGES="fio zookeeper iproute2 e2fsprogs time etcd-server etcd-client ceph-mon ceph-osd ceph-common"

# The program that shows Debian package $1 is installed (ZooKeeper: the start script the
# tests and exp-lunmap run, BLOCKLAB_ZKSERVER overriding it as in core/src/coord/zk_server.rs;
# etcd: BLOCKLAB_ETCD overriding it as in experiments/src/etcd.rs).
package_program() {
  case "$1" in
    fio) echo fio ;;
    zookeeper) echo "${BLOCKLAB_ZKSERVER:-/usr/share/zookeeper/bin/zkServer.sh}" ;;
    iproute2) echo ip ;;
    e2fsprogs) echo mkfs.ext4 ;;
    time) echo /usr/bin/time ;;
    etcd-server) echo "${BLOCKLAB_ETCD:-etcd}" ;; # as experiments/src/etcd.rs: BLOCKLAB_ETCD overrides
    etcd-client) echo etcdctl ;;
    ceph-mon) echo ceph-mon ;;
    ceph-osd) echo ceph-osd ;;
    ceph-common) echo ceph-authtool ;; # brings python3-rados, which monitor sessions use
    *) echo "package_program: unknown package $1" >&2; return 1 ;;
  esac
}

# Whether program $1 (a name, or a path) is installed; the sbin directories count although
# an ordinary user's PATH lacks them (as blocklab::testing::find_program does).
have_program() { PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1; }

# Whether the scripts act as root. BLOCKLAB_PRETEND_NONROOT=1 makes a root shell take the
# non-root path (to try it; the processes still run as root).
is_root() { [ "$(id -u)" -eq 0 ] && [ "${BLOCKLAB_PRETEND_NONROOT:-0}" = 0 ]; }

# Prints the packages of SYSTEM_PACKAGES that are not installed, on one line. Without root,
# BLOCKLAB_PRETEND_MISSING="fio zookeeper" counts those as missing too (to try the
# non-root path on a machine that has them); as root it is ignored: root installs
# everything and nothing may be skipped.
missing_packages() {
  local pkg miss=()
  for pkg in $SYSTEM_PACKAGES; do
    if ! is_root && [[ " ${BLOCKLAB_PRETEND_MISSING:-} " == *" $pkg "* ]]; then
      miss+=("$pkg")
    elif ! have_program "$(package_program "$pkg")"; then
      miss+=("$pkg")
    fi
  done
  echo "${miss[*]}"
}

# Debian's etcd-server starts a system etcd service (ports 2379/2380, data in /var/lib/etcd)
# when installed. The etcd harness runs private members on free ports and needs none, so
# the service this script just installed is stopped and disabled. Called only right after
# installing the package here: an etcd that was there before is left alone, and no data
# directory is touched.
stop_system_etcd() {
  if [ -d /run/systemd/system ]; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/etcd ]; then
    /etc/init.d/etcd stop >/dev/null 2>&1 || true
    update-rc.d etcd disable >/dev/null 2>&1 || true
  fi
}

# As root, installs the missing Debian packages (apt-get). Without root, prints one
# message listing every missing package and the command that installs them all, and goes
# on: what needs a missing package is skipped (tests: blocklab::testing::require_program;
# experiments: missing_for). Either way it exports BLOCKLAB_MISSING_PACKAGES (empty when
# nothing is missing; missing_for does not read it, it looks again).
ensure_system_packages() {
  local need said="${BLOCKLAB_MISSING_PACKAGES-unset}"
  need="$(missing_packages)"
  export BLOCKLAB_MISSING_PACKAGES="$need"
  [ -z "$need" ] && return 0
  if ! is_root; then
    # Said once: a script started by one that said it (scripts/test runs scripts/reproduce)
    # inherits the same list and does not repeat it.
    [ "$said" = "$need" ] && return 0
    echo "not root, so these Debian packages stay missing: $need. The tests and experiments that need them are skipped; to install them all, as root: apt-get install $need" >&2
    return 0
  fi
  log "installing $need"
  apt-get update -qq
  # shellcheck disable=SC2086 # one word per package
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
  [[ " $need " == *" etcd-server "* ]] && stop_system_etcd
  BLOCKLAB_MISSING_PACKAGES="$(missing_packages)"
  if [ -n "$BLOCKLAB_MISSING_PACKAGES" ]; then
    echo "installed $need, but still missing: $BLOCKLAB_MISSING_PACKAGES" >&2
    return 1
  fi
}

# The Debian packages experiment $1 (an exp-* binary) cannot run without, on one line.
# Optional uses are not listed: exp-failover's fio reference for its copy measurement is
# left out with a note when fio is missing, and its netns backend (ip, iproute2) runs only
# as root, so without root it needs nothing.
experiment_needs() {
  case "$1" in
    exp-io) echo fio ;;
    exp-lunmap) echo zookeeper ;;
    exp-commit) echo etcd-server ;; # the production reference runs beside the policies
    exp-failover) if [ "$(id -u)" -eq 0 ]; then echo iproute2; else echo; fi ;; # the binary asks the real user
    exp-init|exp-alloc) echo ;;
    *) echo "experiment_needs: unknown experiment $1 (say what it needs in scripts/common.sh)" >&2; return 1 ;;
  esac
}

# The packages experiment $1 needs that are missing, on one line (empty: it can run).
missing_for() {
  local needs missing pkg out=()
  needs="$(experiment_needs "$1")" || return 1
  missing=" $(missing_packages) "
  for pkg in $needs; do
    [[ "$missing" == *" $pkg "* ]] && out+=("$pkg")
  done
  echo "${out[*]}"
}

# The Rust toolchain rust-toolchain.toml pins. rustup installs it when it can reach its
# servers; where it cannot (a machine without network access) but the default `stable`
# toolchain is exactly that version, the pinned name is made to point at it (a symlink in
# rustup's toolchains directory; nothing existing is changed). Otherwise it stops and says
# why.
ensure_toolchain() {
  command -v rustup >/dev/null 2>&1 || return 0
  local want; want="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$BLOCKLAB_ROOT/rust-toolchain.toml")"
  rustup run "$want" rustc -V >/dev/null 2>&1 && return 0
  log "installing the Rust toolchain $want"
  if rustup toolchain install "$want" --profile minimal -c rustfmt -c clippy >/dev/null 2>&1; then
    return 0
  fi
  local stable host home dir
  stable="$(rustup run stable rustc -V 2>/dev/null | awk '{print $2}')"
  if [ "$stable" != "$want" ]; then
    echo "rust-toolchain.toml pins Rust $want, which rustup cannot install here, and stable is ${stable:-missing}" >&2
    return 1
  fi
  host="$(rustup run stable rustc -vV | sed -n 's/^host: //p')"
  home="${RUSTUP_HOME:-$HOME/.rustup}"
  dir="$(rustup run stable rustc --print sysroot)"
  ln -s "$dir" "$home/toolchains/$want-$host"
  echo "rustup cannot download Rust $want here; stable is $want, so $home/toolchains/$want-$host now points at it" >&2
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

# Every experiment binary: experiments/src/bin/exp-*.rs and exp-*/main.rs, in a fixed order.
experiments() {
  local f
  for f in "$BLOCKLAB_ROOT"/experiments/src/bin/exp-*.rs "$BLOCKLAB_ROOT"/experiments/src/bin/exp-*/main.rs; do
    [ -e "$f" ] || continue
    case "$f" in
      */main.rs) basename "$(dirname "$f")" ;;  # a binary with modules: bin/exp-NAME/main.rs
      *) basename "$f" .rs ;;
    esac
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
