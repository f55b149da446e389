#!/usr/bin/env bash
# Puts ONNX Runtime's C/C++ API headers (API version 21, Debian's libonnxruntime-dev) in DEST.
#
# The onnxruntime wheel ships no headers. Debian 13 packages them; on Debian 12 we read the
# package index of Debian 13 from the same mirror this machine's apt already uses, download the
# one .deb and unpack it without installing anything (no root needed beyond apt's own cache).
set -euo pipefail
DEST=${1:?usage: fetch_ort_headers.sh DEST_DIR}
if [ -f "$DEST/onnxruntime_c_api.h" ]; then exit 0; fi
if [ -f /usr/include/onnxruntime/onnxruntime_c_api.h ]; then
  mkdir -p "$DEST"; cp -r /usr/include/onnxruntime/. "$DEST/"; exit 0
fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts"
# The machine's own Debian mirror, read from its apt configuration (deb822 or one-line format).
uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
if [ -z "$uri" ]; then
  uri=$(awk '$1=="deb" {for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1 || true)
fi
[ -n "$uri" ] || { echo "fetch_ort_headers: no Debian mirror found in /etc/apt" >&2; exit 1; }
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" > "$work/trixie.list"
opts=(-o "Dir::Etc::SourceList=$work/trixie.list" -o "Dir::Etc::SourceParts=$work/parts"
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get -qq "${opts[@]}" update >/dev/null
(cd "$work" && apt-get -qq "${opts[@]}" download libonnxruntime-dev >/dev/null 2>&1)
dpkg -x "$work"/libonnxruntime-dev_*.deb "$work/x"
mkdir -p "$DEST"
cp -r "$work/x/usr/include/onnxruntime/." "$DEST/"
echo "ONNX Runtime headers ($(grep -m1 '#define ORT_API_VERSION' "$DEST/onnxruntime_c_api.h")) in $DEST"
