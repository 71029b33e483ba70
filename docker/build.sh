#!/usr/bin/env bash
# Build the fedrad image from the repository's tracked files only: no key, certificate, virtual
# environment or output that lies in the checkout can enter the image.
#   docker/build.sh [tag]                      (default tag fedrad:cpu)
# Environment (all optional; see docker/Dockerfile): BASE_IMAGE, TORCH_INDEX, PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, CA_BUNDLE (a file), WHEELHOUSE (a folder).
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-fedrad:cpu}
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
git ls-files -z --cached | while IFS= read -r -d '' path; do
    [ -e "$path" ] && cp --parents -- "$path" "$context/"
done
mkdir -p "$context/docker/extras/wheelhouse"
if [ -n "${CA_BUNDLE:-}" ]; then cp -- "$CA_BUNDLE" "$context/docker/extras/ca.pem"; fi
if [ -n "${WHEELHOUSE:-}" ]; then cp -- "$WHEELHOUSE"/*.whl "$context/docker/extras/wheelhouse/"; fi
args=()
for name in BASE_IMAGE TORCH_INDEX PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_NO_INDEX; do
    if [ -n "${!name+set}" ]; then args+=(--build-arg "$name=${!name}"); fi
done
docker build --network host "${args[@]}" -f "$context/docker/Dockerfile" -t "$tag" "$context"
