#!/usr/bin/env bash
# sfr on a Colab GPU, start to finish: install sfr (keeping Colab's torch), fetch SadTalker's weights, render
# a talking head with the face enhancer, show the video.
#
# colab/sfr.ipynb holds the same steps as notebook cells: `python scripts/make_colab_notebook.py` writes it
# from this file, and tests/test_colab.py checks that the two agree and runs these steps on the CPU with
# tiny random weights served from 127.0.0.1 (SFR_DEVICE=cpu SFR_PRECISION=fp32 SFR_CONFIG=tiny
# SFR_ENHANCER=gfpgan-tiny SFR_DOWNLOAD_URL=http://127.0.0.1:PORT/).
#
# Run:  SFR_REPO=<sfr's git URL, or a folder holding sfr> bash scripts/colab.sh
# Each step below is one notebook cell: `# === NAME: what it does ===` starts it.
set -euo pipefail

# === settings: what to install, where everything goes, how to render (edit these) ===
export SFR_REPO="${SFR_REPO:-}"  # REQUIRED unless SFR_SRC holds sfr already: sfr's git URL or a folder
export SFR_WORK="${SFR_WORK:-/content}"  # Colab's working folder
export SFR_SRC="${SFR_SRC:-$SFR_WORK/sfr}"  # where sfr's source (and its demo/ inputs) ends up
export SFR_CHECKPOINTS="${SFR_CHECKPOINTS:-$SFR_WORK/SadTalker/checkpoints}"  # enhancer: ../gfpgan/weights
export SFR_OUT="${SFR_OUT:-$SFR_WORK/sfr-out}"  # a Drive folder (/content/drive/MyDrive/...) survives a disconnect
export SFR_DEVICE="${SFR_DEVICE:-cuda}"
export SFR_PRECISION="${SFR_PRECISION:-fp16}"  # the T4's fast precision; fp32 is about 2.5x slower there
export SFR_CONFIG="${SFR_CONFIG:-facerender}"  # tiny: test widths (CI)
export SFR_ENHANCER="${SFR_ENHANCER:-gfpgan}"  # gfpgan-tiny: test widths (CI)
export SFR_COEFFS="${SFR_COEFFS:-$SFR_SRC/demo/coeffs.npy}"  # SadTalker coefficients (.mat or .npy)
export SFR_FACE="${SFR_FACE:-$SFR_SRC/demo/source.png}"
export SFR_AUDIO="${SFR_AUDIO:-$SFR_SRC/demo/speech.wav}"
export SADTALKER_DIR="${SADTALKER_DIR:-}"  # e.g. $SFR_WORK/SadTalker: run SadTalker's inference.py, sfr rendering
export SFR_PIP_FLAGS="${SFR_PIP_FLAGS:-}"  # extra pip flags (CI: --no-build-isolation --no-index)

# === install: sfr from SFR_REPO; pip keeps Colab's torch (sfr asks for torch>=2.1, which it has) ===
if [ ! -d "$SFR_SRC" ]; then
  if [ -z "$SFR_REPO" ]; then echo "Set SFR_REPO to sfr's git URL (or a folder holding sfr)" >&2; exit 1; fi
  if [ -d "$SFR_REPO" ]; then cp -r "$SFR_REPO" "$SFR_SRC"; else git clone --depth 1 "$SFR_REPO" "$SFR_SRC"; fi
fi
python -m pip install -q $SFR_PIP_FLAGS "$SFR_SRC"
sfr --version

# === sadtalker: only with SADTALKER_DIR set: SadTalker's checkout and the packages its own steps need ===
if [ -n "$SADTALKER_DIR" ]; then
  [ -d "$SADTALKER_DIR" ] || git clone --depth 1 https://github.com/OpenTalker/SadTalker "$SADTALKER_DIR"
  # its preprocessing and audio-to-coefficients; not torch (Colab's stays), nor its renderer's packages
  # (gfpgan, basicsr: sfr replaces that stage), nor its old pins
  grep -v -E '^(torch|torchvision|numpy|gradio|gfpgan|basicsr)\b' "$SADTALKER_DIR/requirements.txt" \
    | sed -E 's/[=<>].*//; s/#.*//' | grep -v '^ *$' > "$SFR_WORK/sadtalker-requirements.txt"
  python -m pip install -q $SFR_PIP_FLAGS -r "$SFR_WORK/sadtalker-requirements.txt"
fi

# === weights: SadTalker's renderer, mapping and face-enhancer files (resumed if a run was cut off) ===
sfr checkpoints download "$SFR_CHECKPOINTS" --enhancer --config "$SFR_CONFIG"

# === render: SadTalker's inference.py with sfr as its renderer, or sfr render on coefficients ===
mkdir -p "$SFR_OUT"
if [ -n "$SADTALKER_DIR" ]; then
  (cd "$SADTALKER_DIR" && python -m sfr_cli.sadtalker --precision "$SFR_PRECISION" --config "$SFR_CONFIG" \
    inference.py --driven_audio "$SFR_AUDIO" --source_image "$SFR_FACE" --enhancer gfpgan \
    --checkpoint_dir "$SFR_CHECKPOINTS" --result_dir "$SFR_OUT")
else
  sfr render --coeffs "$SFR_COEFFS" --source "$SFR_FACE" --audio "$SFR_AUDIO" \
    --checkpoint-dir "$SFR_CHECKPOINTS" --config "$SFR_CONFIG" --device "$SFR_DEVICE" \
    --precision "$SFR_PRECISION" --enhancer "$SFR_ENHANCER" -o "$SFR_OUT/sfr-demo.mp4" --overwrite
fi

# === show: the newest video in SFR_OUT ===
ls -t "$SFR_OUT"/*.mp4 | head -n 1
