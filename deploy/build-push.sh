#!/bin/sh
# Build the three DFlare Serve images and push them to REGISTRY, tagged with the chart's appVersion,
# which is the tag the chart pulls by default. Run from anywhere; builds from the repository root.
#
#   deploy/build-push.sh registry.example.com/dflare-serve            # gateway, engine and cpu
#   deploy/build-push.sh registry.example.com/dflare-serve gateway    # only some of them
#
# Then: helm install dflare ./helm --set global.imageRegistry=registry.example.com/dflare-serve ...
# Extra `docker build` arguments come from DOCKER_BUILD_ARGS (e.g. "--build-arg FLASHINFER_CUDA=cu130").
set -eu

if [ $# -lt 1 ] || [ -z "$1" ]; then
    echo "usage: $0 REGISTRY [gateway|engine|cpu ...]  (REGISTRY as in global.imageRegistry)" >&2
    exit 2
fi
registry="${1%/}"
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
tag="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$root/helm/Chart.yaml")"
if [ -z "$tag" ]; then
    echo "no appVersion in $root/helm/Chart.yaml" >&2
    exit 1
fi
images="${*:-gateway engine cpu}"

for name in $images; do
    dockerfile="$root/deploy/Dockerfile.$name"
    if [ ! -f "$dockerfile" ]; then
        echo "unknown image '$name' (gateway, engine or cpu)" >&2
        exit 2
    fi
    echo "building $registry/$name:$tag"
    # shellcheck disable=SC2086  # DOCKER_BUILD_ARGS is a list of words on purpose
    docker build -f "$dockerfile" -t "$registry/$name:$tag" ${DOCKER_BUILD_ARGS:-} "$root"
done
for name in $images; do
    docker push "$registry/$name:$tag"
done
echo "pushed $(echo "$images" | wc -w) image(s) to $registry with tag $tag"
