#!/usr/bin/env bash
# Install the Debian packages armodal uses (Fashion-MNIST IDX files, fluidsynth + General MIDI soundfont)
# when they are missing and we are root; otherwise say how to get them. Never fails the build.
set -u
pkgs=(dataset-fashion-mnist fluidsynth fluid-soundfont-gm)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[armodal] installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } \
    || echo "[armodal] warning: could not install ${missing[*]}; image data / audio rendering will be skipped"
else
  echo "[armodal] note: missing Debian packages ${missing[*]} (run as root: apt-get install ${missing[*]})"
fi
exit 0
