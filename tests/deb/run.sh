#!/usr/bin/env bash
# `make test-deb DEB`: install the package with apt in a fresh, minimal Debian bookworm
# chroot and check that it just works there, without PyPI:
#   - apt installs it (twice: the maintainer scripts are idempotent) from Debian's archive;
#     no pip in the chroot, no pyln module outside the package;
#   - `pibackup --help`; the files land where docs/dev/packaging.md and pibackup(1) say;
#   - inside.py, as a non-root user and with no network at all, with broken pyln-client and
#     sdnotify modules in the user's site-packages and PYTHONPATH: a real recording replayed
#     through the installed plugin, restored with the installed command, compared with the
#     real lightningd database; the plugin's RSS printed;
#   - the LED without root: the udev rule and group pibackup-led in the .deb, the rule's
#     command applied to a root-owned stand-in LED, user bitcoin driving it once in the group;
#   - apt remove and apt purge leave the backup directory byte for byte as it was (purge
#     removes the group).
# The chroot (debootstrap --variant=minbase) is made once and kept as a tarball in
# $PIBACKUP_CACHE (~/.cache/pibackup), with the .debs apt fetched. Root only.
set -euo pipefail

deb=$(realpath "$1")
trace=${PIBACKUP_DEB_TRACE:-A}
repo=$(cd "$(dirname "$0")/../.." && pwd)
traces=${PIBACKUP_TRACES:-$repo/../shared/traces}
cache=${PIBACKUP_CACHE:-$HOME/.cache/pibackup}
mirror=${PIBACKUP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
arch=$(dpkg --print-architecture)
tarball=$cache/$suite-minbase-$arch.tar
root=$repo/build/deb-chroot
backup=/mnt/usb/pibackup
start=$(date +%s)
passed=0

if [ "$(id -u)" != 0 ]; then
    echo "test-deb: needs root (debootstrap, chroot, mounts)" >&2
    exit 1
fi
for f in "$traces/$trace.jsonl" "$traces/$trace.sqlite3"; do
    [ -f "$f" ] || { echo "test-deb: $f not found; set PIBACKUP_TRACES" >&2; exit 1; }
done

ok() { passed=$((passed + 1)); echo "ok: $*"; }
in_root() { chroot "$root" "$@"; }
umount_under() {  # every mount below $1, deepest first
    awk -v d="$1/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
}
finish() {
    rc=$?
    umount_under "$root"
    if [ "$rc" = 0 ]; then
        rm -rf --one-file-system "$root"
    else
        echo "test-deb: FAILED; the chroot is left in $root for a look" >&2
        echo "test-deb: $passed passed, 1 failed"
    fi
    exit "$rc"
}
trap finish EXIT

# --- the .deb itself: the LED's udev rule, its group, adduser ------------------------------
contents=$(dpkg-deb -c "$deb")
rule_path=$(echo "$contents" | awk '{print $NF}' | grep -E '^\./(usr/)?lib/udev/rules\.d/60-pibackup\.rules$' | sed 's/^\.//')
[ -n "$rule_path" ] || { echo "test-deb: no udev rule 60-pibackup.rules in the package" >&2; exit 1; }
dpkg-deb -I "$deb" postinst | grep -q 'addgroup --system --quiet pibackup-led'
dpkg-deb -I "$deb" postinst | grep -q 'udevadm trigger --subsystem-match=leds'
dpkg-deb -I "$deb" postrm | grep -q 'delgroup --system --quiet pibackup-led'
dpkg-deb -f "$deb" Depends | grep -qw adduser
ok "the package holds $rule_path; postinst makes group pibackup-led and triggers udev for leds, postrm purges the group; Depends: adduser"

# --- the chroot: a cached minimal bookworm -------------------------------------------------
mkdir -p "$cache/apt-archives/partial"
if [ ! -f "$tarball" ]; then
    echo "test-deb: debootstrap $suite ($arch) from $mirror, once; cached as $tarball"
    tmp=$(mktemp -d "$cache/bootstrap.XXXXXX")
    debootstrap --variant=minbase "$suite" "$tmp/root" "$mirror" > "$tmp/log" 2>&1 || {
        tail -20 "$tmp/log" >&2
        umount_under "$tmp"
        exit 1
    }
    umount_under "$tmp"
    chroot "$tmp/root" apt-get clean
    tar -C "$tmp/root" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf --one-file-system "$tmp"
fi
umount_under "$root"
rm -rf --one-file-system "$root"
mkdir -p "$root"
tar -C "$root" -xf "$tarball"
mount -t proc proc "$root/proc"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"  # apt logs maintainer scripts' output through a pty
mount --bind "$cache/apt-archives" "$root/var/cache/apt/archives"
cp /etc/resolv.conf "$root/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"  # start no services in here
chmod +x "$root/usr/sbin/policy-rc.d"
ok "fresh $suite chroot from $tarball"

# --- install with apt, from Debian's archive alone ---------------------------------------
export DEBIAN_FRONTEND=noninteractive
in_root apt-get update -qq
cp "$deb" "$root/tmp/"
name=$(basename "$deb")
in_root apt-get install -y -q "/tmp/$name" > "$root/tmp/apt-install.log" 2>&1 || { cat "$root/tmp/apt-install.log" >&2; exit 1; }
grep -E '^(Get|The following NEW)' "$root/tmp/apt-install.log" | head -3 || true
in_root apt-get install -y -q --reinstall "/tmp/$name" > "$root/tmp/apt-reinstall.log" 2>&1 || { cat "$root/tmp/apt-reinstall.log" >&2; exit 1; }
ok "apt-get install ./$name, and again with --reinstall"

if in_root python3 -m pip --version > /dev/null 2>&1; then
    echo "test-deb: pip is installed in the chroot; the package must not need it" >&2
    exit 1
fi
if in_root python3 -I -c 'import pyln' > /dev/null 2>&1; then
    echo "test-deb: a pyln module is installed outside the package" >&2
    exit 1
fi
ok "no pip and no pyln module in the chroot outside /usr/lib/pibackup"

for f in /usr/lib/pibackup/pibackup.py /usr/lib/pibackup/pibackup/app/plugin.py /usr/lib/pibackup/vendor/pyln/client/plugin.py \
    /usr/bin/pibackup /usr/share/man/man1/pibackup.1.gz /usr/share/doc/pibackup/README.md.gz \
    /usr/share/doc/pibackup/docs/guide/options.md.gz /usr/share/doc/pibackup/docs/FORMAT.md.gz \
    /usr/share/doc/pibackup/examples/lightningd-config /usr/lib/systemd/system/lightningd.service.d/pibackup.conf; do
    [ -e "$root$f" ] || { echo "test-deb: $f is missing" >&2; exit 1; }
done
[ -x "$root/usr/lib/pibackup/pibackup.py" ] || { echo "test-deb: the plugin is not executable" >&2; exit 1; }
grep -qx 'NotifyAccess=all' "$root/usr/lib/systemd/system/lightningd.service.d/pibackup.conf"
ls "$root"/usr/lib/pibackup/vendor/pyln/client/__pycache__/plugin.cpython-311.pyc > /dev/null  # py3compile ran
ok "files in place: plugin (executable), vendored pyln-client byte-compiled, command, man page, docs (README, user guide, format), example, systemd drop-in"

in_root pibackup --help > "$root/tmp/help.txt"
grep -q restore "$root/tmp/help.txt"
in_root pibackup --version
in_root pibackup check --json /tmp > "$root/tmp/check.json" || [ $? = 1 ]  # 1: a warning (which depends on this machine)
in_root python3 -c 'import json; r = json.load(open("/tmp/check.json")); assert r["sync_ms"]["samples"] == 32, r'
[ -z "$(find "$root/tmp" -maxdepth 1 -name '.pibackup-check-*')" ] || { echo "test-deb: pibackup check left its file" >&2; exit 1; }
ok "pibackup --help; pibackup check /tmp reports JSON and removes its file"

# --- the LED without root: the rule's command on a root-owned stand-in, the group, the plugin's LED
in_root getent group pibackup-led > /dev/null || { echo "test-deb: postinst made no group pibackup-led" >&2; exit 1; }
grep -q 'SUBSYSTEM=="leds"' "$root$rule_path"
in_root useradd --create-home bitcoin
leds=/tmp/leds
mkdir -p "$root$leds/ACT"
printf 'none timer [mmc0] heartbeat\n' > "$root$leds/ACT/trigger"
echo 0 > "$root$leds/ACT/brightness"
echo 255 > "$root$leds/ACT/max_brightness"
chmod 0644 "$root$leds/ACT/"*
drive_led='import sys; sys.path.insert(0, "/usr/lib/pibackup"); from pibackup.app.status import Led; Led("ACT", "/tmp/leds").show("ok")'
if chroot --userspec=bitcoin:bitcoin "$root" python3 -I -c "$drive_led" 2> /dev/null; then
    echo "test-deb: user bitcoin could write a root-owned 0644 LED; this check would prove nothing" >&2
    exit 1
fi
# What udev runs when an LED appears, with /sys%p standing for the stand-in LED
run=$(sed -n "s|.*RUN+=\"/bin/sh -c '\(.*\)'\"\$|\1|p" "$root$rule_path" | sed -e "s|/sys%p|$leds/ACT|" -e 's/\$\$/$/g')
[ -n "$run" ] || { echo "test-deb: cannot read the RUN command of $rule_path" >&2; exit 1; }
in_root sh -c "$run"
mode=$(in_root stat -c '%G %a' "$leds/ACT/trigger")  # the chroot's group names, not the host's
[ "$mode" = "pibackup-led 664" ] || { echo "test-deb: the rule left $leds/ACT/trigger $mode" >&2; exit 1; }
in_root adduser --quiet bitcoin pibackup-led
chroot --userspec=bitcoin:bitcoin --groups=pibackup-led "$root" python3 -I -c "$drive_led"
[ "$(cat "$root$leds/ACT/trigger")" = heartbeat ] || { echo "test-deb: user bitcoin did not drive the LED" >&2; exit 1; }
in_root deluser --quiet bitcoin pibackup-led
ok "group pibackup-led exists; the rule's command hands a root-owned LED's trigger and brightness to it (g=u); then user bitcoin, added to it, drives the LED with the installed module"

# --- a replay through the installed plugin, as a non-root user, with no network ---------
mkdir -p "$root$backup" "$root/opt/pibackup-test/traces"
in_root chown bitcoin: "$backup"
cp "$repo/tests/driver.py" "$repo/tests/dbcompare.py" "$repo/tests/deb/inside.py" "$root/opt/pibackup-test/"
cp "$traces/$trace.jsonl" "$traces/$trace.sqlite3" "$root/opt/pibackup-test/traces/"
# What breaks installs of the older backup plugin: modules of another version where Python
# looks first (a `pip install --user` of pyln-client or sdnotify, a PYTHONPATH). Put broken
# ones in both places; the installed plugin and command (python3 -I) must not import them.
as_bitcoin() { chroot --userspec=bitcoin:bitcoin "$root" env -i HOME=/home/bitcoin PATH=/usr/bin:/bin LANG=C.UTF-8 "$@"; }
user_site=$(as_bitcoin python3 -c 'import site; print(site.getusersitepackages())')
for d in "$user_site" /home/bitcoin/stray; do
    mkdir -p "$root$d/pyln/client"
    echo 'raise ImportError("a stray pyln-client, not the package one")' > "$root$d/pyln/client/__init__.py"
    echo 'raise ImportError("a stray sdnotify, not Debian one")' > "$root$d/sdnotify.py"
done
in_root chown -R bitcoin: /home/bitcoin
if as_bitcoin python3 -c 'import sdnotify' 2> /dev/null || as_bitcoin PYTHONPATH=/home/bitcoin/stray python3 -c 'import pyln.client' 2> /dev/null; then
    echo "test-deb: the stray modules are not where a plain python3 finds them first; this check would prove nothing" >&2
    exit 1
fi
ok "stray pyln-client and sdnotify in user bitcoin's site-packages and PYTHONPATH, which a plain python3 imports"
unshare --net chroot --userspec=bitcoin:bitcoin "$root" \
    env -i HOME=/home/bitcoin PATH=/usr/bin:/bin LANG=C.UTF-8 PIBACKUP_TRACES=/opt/pibackup-test/traces PYTHONPATH=/home/bitcoin/stray \
    python3 /opt/pibackup-test/inside.py "$backup" "$trace"
ok "replay of $trace through the installed plugin, restore and verify with the installed command (user bitcoin, no network, stray modules ignored)"

# --- remove and purge leave the backup alone ---------------------------------------------
digest() { (cd "$root$backup" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16); }
files=$(find "$root$backup" -type f | wc -l)
before=$(digest)
in_root apt-get remove -y -q pibackup > /dev/null
[ "$(digest)" = "$before" ] || { echo "test-deb: apt-get remove changed $backup" >&2; exit 1; }
if [ -e "$root/usr/lib/pibackup/pibackup.py" ] || [ -e "$root/usr/bin/pibackup" ]; then
    echo "test-deb: the package's files are still there after apt-get remove" >&2
    exit 1
fi
in_root apt-get install -y -q "/tmp/$name" > /dev/null 2>&1
in_root apt-get purge -y -q pibackup > /dev/null
[ "$(digest)" = "$before" ] || { echo "test-deb: apt-get purge changed $backup" >&2; exit 1; }
[ ! -e "$root/usr/lib/pibackup" ] || { echo "test-deb: /usr/lib/pibackup left after purge: $(find "$root/usr/lib/pibackup" | head)" >&2; exit 1; }
in_root dpkg -s pibackup > /dev/null 2>&1 && { echo "test-deb: pibackup still known to dpkg after purge" >&2; exit 1; }
in_root getent group pibackup-led > /dev/null && { echo "test-deb: group pibackup-led left after purge" >&2; exit 1; }
ok "apt-get remove, then install and purge: the backup's $files files unchanged (digest $before), the package's files gone"

echo "test-deb: $(basename "$deb") $(stat -c %s "$deb") bytes, $(($(date +%s) - start)) s"
echo "test-deb: $passed passed, 0 failed"
