#!/usr/bin/env bash
# The action's install step (action.yml): torch from PyTorch's CPU index first, pinned, so that
# installing loratool then finds torch satisfied and never pulls the multi-GB CUDA build; then
# loratool itself. LORATOOL_PIP replaces `python -m pip` (tests record the commands instead).
set -euo pipefail
read -r -a pip <<< "${LORATOOL_PIP:-python -m pip}"
case "${INPUT_TORCH:-cpu}" in
  cpu) "${pip[@]}" install "torch==${INPUT_TORCH_VERSION:?}" --index-url https://download.pytorch.org/whl/cpu ;;
  skip) ;;
  *)
    echo "::error title=loratool action::input torch must be cpu or skip, not '${INPUT_TORCH}'"
    exit 2
    ;;
esac
"${pip[@]}" install "${INPUT_PACKAGE:-${GITHUB_ACTION_PATH:?}}"
