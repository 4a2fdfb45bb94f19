#!/usr/bin/env bash
# `make deb`: dist/pibackup_<version>_all.deb from this checkout, then lintian on it.
# Needs the network once, for the pinned pyln-client wheel from PyPI (packaging/vendor/
# requirements.txt, checked by hash); the package build itself is offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' pibackup/__init__.py)
deb_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "$version" != "$deb_version" ]; then
    echo "make deb: pibackup/__init__.py says $version, packaging/debian/changelog says $deb_version: add a changelog entry (dch -v $version)" >&2
    exit 1
fi

stage=build/deb
src=$stage/pibackup-$version
rm -rf "$stage"
mkdir -p "$src/pibackup" "$src/vendor-wheels" dist
cp pibackup.py README.md "$src/"
cp -r docs "$src/docs"
find pibackup -name '*.py' -exec cp --parents {} "$src/" \;  # the package tree, subpackages included
cp -r packaging "$src/packaging"
cp -r packaging/debian "$src/debian"

"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -r packaging/vendor/requirements.txt -d "$src/vendor-wheels"

(cd "$src" && dpkg-buildpackage -b -us -uc --no-sign > ../dpkg-buildpackage.log 2>&1) || {
    tail -40 "$stage/dpkg-buildpackage.log" >&2
    exit 1
}
deb=pibackup_${version}_all.deb
mv "$stage/$deb" dist/
echo "built dist/$deb ($(stat -c %s "dist/$deb") bytes)"

# No errors allowed; the warnings left are listed, with reasons, in docs/dev/packaging.md.
lintian --fail-on error --info --tag-display-limit 0 "dist/$deb"
echo "lintian: no errors"
