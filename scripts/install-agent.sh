#!/bin/sh
# Installs the Caisey agent on a Linux machine in one line, for MDM tools and scripts:
#
#   sudo sh install-agent.sh --from URL-or-FILE --sha256 HEX [--user USER]... TOKEN
#   sudo sh install-agent.sh --uninstall [--delete-store]
#
# 1. fetches the caisey-agent binary (a URL, with curl or wget, or a file on a share);
# 2. checks its SHA-256 against the one given, and refuses anything else;
# 3. puts it in PREFIX/bin (default /usr/local) in one move, so a running agent never sees half a file;
# 4. runs `caisey-agent install TOKEN`: enrolls, writes and starts the service, adds the
#    consent window to every graphical login, lets --user accounts approve;
# 5. writes its man pages and bash completion.
#
# --uninstall takes off all of it: the service, the consent window, the settings, the group,
# the binary, its man pages and completion (and the store, with --delete-store).
#
# Safe to run again (an MDM re-runs scripts): the same binary is left as it is, an enrolled
# machine keeps its enrollment. Every failure is one line on stderr and a non-zero exit:
#   2 usage or local failure (not root, no download tool, bad checksum, ...),
#   3 the agent could not install (token used or expired, org unreachable, ...).
set -eu

prefix=/usr/local
root=
from=
sha=
token=
pass=
uninstall=
store=--keep-store

die() { echo "install-agent: $1" >&2; exit "${2:-2}"; }
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --from) from=${2:?--from needs a URL or a file}; shift 2 ;;
        --sha256) sha=${2:?--sha256 needs the binary\'s SHA-256}; shift 2 ;;
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        --user|--name|--group) pass="$pass $1 $(quote "${2:?$1 needs a value}")"; shift 2 ;;
        --uninstall) uninstall=1; shift ;;
        --delete-store) store=--delete-store; shift ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$token" ] || die "one token only (see --help)"; token=$1; shift ;;
    esac
done
bin_dir="$root$prefix/bin"
dest="$bin_dir/caisey-agent"
man_dir="$root$prefix/share/man/man1"
completions="$root/usr/share/bash-completion/completions"

if [ -n "$uninstall" ]; then
    [ "$(id -u)" = 0 ] || die "removing the agent needs root: sudo sh $0 --uninstall"
    if [ -x "$dest" ]; then
        if [ -n "$root" ]; then "$dest" uninstall "$store" --root "$root" || exit 3
        else "$dest" uninstall "$store" || exit 3; fi
    fi
    rm -f "$dest" "$man_dir"/caisey-agent.1 "$man_dir"/caisey-agent-*.1 "$completions/caisey-agent"
    echo "removed $dest, its man pages and completion"
    exit 0
fi
[ -n "$from" ] || die "say where the binary is: --from URL-or-FILE"
[ -n "$sha" ] || die "give the binary's SHA-256 with --sha256 (from whoever built it)"
printf '%s' "$sha" | grep -Eq '^[0-9a-fA-F]{64}$' || die "--sha256 takes 64 hexadecimal digits"
[ "$(id -u)" = 0 ] || die "installing the agent needs root: sudo sh $0 ..."
command -v sha256sum >/dev/null || die "sha256sum is missing (coreutils)"

mkdir -p "$bin_dir"
tmp="$bin_dir/.caisey-agent.download.$$"
trap 'rm -f "$tmp"' EXIT INT TERM

case "$from" in
    http://*|https://*)
        if command -v curl >/dev/null; then
            curl -fsSL --retry 3 -o "$tmp" "$from" || die "could not download $from"
        elif command -v wget >/dev/null; then
            wget -q -O "$tmp" "$from" || die "could not download $from"
        else
            die "neither curl nor wget is here to download $from"
        fi ;;
    *) [ -f "$from" ] || die "no file at $from"; cp "$from" "$tmp" ;;
esac
got=$(sha256sum "$tmp" | cut -d' ' -f1)
want=$(printf '%s' "$sha" | tr 'A-F' 'a-f')
[ "$got" = "$want" ] || die "checksum mismatch for $from: expected $want, got $got; nothing installed"

if [ -f "$dest" ] && [ "$(sha256sum "$dest" | cut -d' ' -f1)" = "$want" ]; then
    echo "caisey-agent $want is already in place at $dest"
else
    chmod 0755 "$tmp"
    mv -f "$tmp" "$dest"
    echo "placed caisey-agent at $dest (sha256 $want)"
fi

args="install --binary $(quote "$prefix/bin/caisey-agent")$pass"
[ -z "$root" ] || args="$args --root $(quote "$root")"
[ -z "$token" ] || args="$args $(quote "$token")"
eval "set -- $args"
"$dest" "$@" || exit 3

mkdir -p "$man_dir" && "$dest" man --out "$man_dir" || echo "install-agent: man pages not written" >&2
if [ -d "$completions" ]; then
    "$dest" completions bash > "$completions/caisey-agent" || echo "install-agent: bash completion not written" >&2
fi
echo "done: the agent is installed as caisey-agent.service; \`caisey-agent pending\` lists what waits for approval"
