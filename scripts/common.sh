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

# Every experiment binary: experiments/src/bin/exp-*.rs, in a fixed order.
experiments() {
  local f
  for f in "$BLOCKLAB_ROOT"/experiments/src/bin/exp-*.rs; do
    [ -e "$f" ] || continue
    basename "$f" .rs
  done | sort
}

# Runs notebook NAME.ipynb on the results in $1, writing figures to $2 and the executed
# notebook to $3. Fails when the notebook fails or writes no figure named NAME*.
run_notebook() {
  local name="$1" results="$2" figures="$3" executed="$4"
  local nb="$BLOCKLAB_ROOT/notebooks/$name.ipynb"
  [ -f "$nb" ] || { echo "no notebook for $name" >&2; return 0; }
  mkdir -p "$figures" "$executed"
  log "notebook $name"
  BLOCKLAB_RESULTS="$results" BLOCKLAB_FIGURES="$figures" MPLBACKEND=Agg \
    "$VENV/bin/jupyter" nbconvert --to notebook --execute --ExecutePreprocessor.timeout=600 \
    --output-dir "$executed" "$nb" >/dev/null
  if ! compgen -G "$figures/$name*" >/dev/null; then
    echo "notebook $name wrote no figure into $figures" >&2
    return 1
  fi
}
