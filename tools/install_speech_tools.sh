#!/usr/bin/env bash
# espeak-ng and sox speak notebook 05's held-out spoken questions (capstone_lib/spoken_set.py).
# Installs them with apt-get (Debian, Ubuntu, Colab) when missing; `--required` fails if it cannot.
set -u
missing=()
for tool in espeak-ng sox; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
    echo "installing ${missing[*]} (apt-get) for notebook 05's spoken questions"
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox >/dev/null && exit 0
fi
echo "WARNING: ${missing[*]} not installed; notebook 05 on the cpu profile needs them" \
     "(Debian/Ubuntu/Colab: apt-get install espeak-ng sox; macOS: brew install espeak-ng sox)" >&2
[ "${1:-}" = "--required" ] && exit 1
exit 0
