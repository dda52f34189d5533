#!/usr/bin/env bash
# Builds the two container images (docs/images.md) with buildah, daemonless, without pulling
# anything from a registry:
#   <registry>/skillkv           the daemon    (images/daemon.Containerfile)
#   <registry>/skillkv-operator  the operator  (images/operator.Containerfile)
# each tagged <version> (the workspace crate version, which is also the chart's appVersion and
# the operator's default daemon tag) and <version>-<git short revision>[-dirty].
#
# The Containerfiles are FROM scratch and only COPY; this script assembles their build contexts:
# the release binaries, the shared libraries `ldd` lists for them (from this machine), the NVRTC
# and cuBLAS libraries from PyPI's NVIDIA wheels (pinned in images/cuda-wheels.txt), busybox and
# curl for the operator's fetch-model init container, /etc/passwd with the nonroot user, and in
# both images skill detection's static embeddings (scripts/fetch-detector-embeddings.sh) at
# /opt/skillkv/detector, which the images' SKILLKV_DETECTOR_EMBEDDINGS names.
#
# Usage: scripts/images.sh [check|context|build|version]
#   check: the chart and the operator name these images; context: assemble the build contexts;
#   build (default): both, then buildah; version: print `<version> <revision>`.
# Environment:
#   IMAGE_REGISTRY          registry/path prefix (default ghcr.io/skillkv, as the chart)
#   IMAGES_WORK             work directory (default ~/.cache/skillkv/images)
#   IMAGE_REVISION          revision tag and label (default: git short revision, -dirty)
#   IMAGE_STRIP             1 (default): strip the binaries' debug info (line tables); 0: keep it
#   BUILDAH_STORAGE_DRIVER  buildah storage driver (default vfs: works in any container)
#   CARGO_TARGET_DIR        where the release binaries are (default <repo>/target)
# Needs: buildah, busybox (static), curl, ldd, strip, python3 with pip, git; the release binaries
# (`make images` builds them first).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

REGISTRY=${IMAGE_REGISTRY:-ghcr.io/skillkv}
REGISTRY=${REGISTRY%/}
WORK=${IMAGES_WORK:-$HOME/.cache/skillkv/images}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
RELEASE=$TARGET/release
PYTHON=${PYTHON:-python3}
BUILDAH=(buildah --storage-driver "${BUILDAH_STORAGE_DRIVER:-vfs}")
MULTIARCH=usr/lib/x86_64-linux-gnu
CUDA_DIR=opt/skillkv/cuda/lib
DETECTOR_DIR=opt/skillkv/detector
# The shared libraries of the wheels the daemon loads (and what they load themselves).
CUDA_LIBS=(libnvrtc.so.12 libnvrtc-builtins.so.12.8 libcublas.so.12 libcublasLt.so.12)
# busybox applets the fetch-model init script uses (operator/src/build/model_source.rs).
APPLETS=(sh mkdir dirname mv rm sha256sum cat)

die() {
    echo "images.sh: $*" >&2
    exit 1
}

# The workspace version (Cargo.toml [workspace.package]).
crate_version() {
    sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n1
}

revision() {
    if [[ -n ${IMAGE_REVISION:-} ]]; then
        echo "$IMAGE_REVISION"
        return
    fi
    local rev
    rev=$(git rev-parse --short HEAD)
    if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        rev="$rev-dirty"
    fi
    echo "$rev"
}

# The image names: `<registry>/<repository>:<version>`.
daemon_image() { echo "$REGISTRY/skillkv"; }
operator_image() { echo "$REGISTRY/skillkv-operator"; }

# One version value: the chart's appVersion (its default image tag) and the operator's default
# daemon image (ghcr.io/skillkv/skillkv:$CARGO_PKG_VERSION) must name what this script builds.
check() {
    local version app_version
    version=$(crate_version)
    [[ -n $version ]] || die "no version in Cargo.toml [workspace.package]"
    app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/skillkv/Chart.yaml)
    [[ $app_version == "$version" ]] ||
        die "charts/skillkv/Chart.yaml appVersion '$app_version' != crate version '$version'"
    local values=charts/skillkv/values.yaml
    grep -Eq '^  registry: ghcr\.io/skillkv$' "$values" ||
        die "$values image.registry is not ghcr.io/skillkv"
    grep -Eq '^  daemonRepository: skillkv$' "$values" ||
        die "$values image.daemonRepository is not skillkv"
    grep -Eq '^  operatorRepository: skillkv-operator$' "$values" ||
        die "$values image.operatorRepository is not skillkv-operator"
    grep -Eq '^  tag: ""$' "$values" ||
        die "$values image.tag must stay empty (the chart's appVersion)"
    grep -q 'concat!("ghcr.io/skillkv/skillkv:", env!("CARGO_PKG_VERSION"))' operator/src/settings.rs ||
        die "operator/src/settings.rs DEFAULT_DAEMON_IMAGE is not ghcr.io/skillkv/skillkv:<crate version>"
    echo "images: version $version; chart appVersion and operator default daemon image agree"
}

# Copies the shared libraries `ldd` resolves for each ELF file into $dest/$MULTIARCH (and the
# dynamic loader, with the /lib64 path the binaries name), skipping any already in one of the
# directories in $SKIP_IN (earlier layers) and those named in $SKIP_NAMES.
SKIP_IN=()
SKIP_NAMES=()
copy_libs() {
    local dest=$1
    shift
    local elf line path name skip
    mkdir -p "$dest/$MULTIARCH"
    for elf in "$@"; do
        while read -r line; do
            case $line in
                *"not found"*) die "ldd $elf: $line" ;;
                *"=> /"*) path=${line#*=> }; path=${path%% (*} ;;
                /*) path=${line%% (*} ;;
                *) continue ;;
            esac
            name=$(basename "$path")
            skip=0
            for other in "${SKIP_NAMES[@]}"; do [[ $name == "$other" ]] && skip=1; done
            for other in "${SKIP_IN[@]}"; do [[ -e $other/$MULTIARCH/$name ]] && skip=1; done
            ((skip)) && continue
            cp -L --preserve=mode "$path" "$dest/$MULTIARCH/$name"
        done < <(LD_LIBRARY_PATH="${LIBRARY_PATH_EXTRA:-}" ldd "$elf")
    done
}

# A root file system skeleton: merged /usr, the nonroot user, CA certificates, /tmp.
skeleton() {
    local dest=$1
    mkdir -p "$dest/$MULTIARCH" "$dest/usr/lib64" "$dest/usr/bin" "$dest/etc/ssl/certs" "$dest/tmp"
    ln -sfn usr/lib "$dest/lib"
    ln -sfn usr/lib64 "$dest/lib64"
    ln -sfn usr/bin "$dest/bin"
    ln -sfn ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$dest/usr/lib64/ld-linux-x86-64.so.2"
    chmod 1777 "$dest/tmp"
    printf '%s\n' 'root:x:0:0:root:/root:/nonexistent' \
        'nonroot:x:65532:65532:nonroot:/home/nonroot:/nonexistent' >"$dest/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$dest/etc/group"
    printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' >"$dest/etc/nsswitch.conf"
    cp -L /etc/ssl/certs/ca-certificates.crt "$dest/etc/ssl/certs/ca-certificates.crt"
}

home_layer() {
    local dest=$1
    mkdir -p "$dest/nonroot"
    chmod 0755 "$dest/nonroot"
}

# Downloads the pinned wheels (once) and unpacks the libraries in CUDA_LIBS into $1.
cuda_libs() {
    local dest=$1 wheels=$WORK/wheels unpacked=$WORK/wheels/unpacked
    mkdir -p "$wheels"
    local stamp
    stamp="$wheels/.$(sha256sum images/cuda-wheels.txt | cut -c1-16)"
    if [[ ! -e $stamp ]]; then
        "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: --require-hashes -r images/cuda-wheels.txt -d "$wheels"
        rm -rf "$unpacked"
        mkdir -p "$unpacked"
        local wheel
        for wheel in "$wheels"/nvidia_*.whl; do
            "$PYTHON" -m zipfile -e "$wheel" "$unpacked"
        done
        touch "$stamp"
    fi
    mkdir -p "$dest/$CUDA_DIR"
    local lib found
    for lib in "${CUDA_LIBS[@]}"; do
        found=$(find "$unpacked/nvidia" -name "$lib" -type f | head -n1)
        [[ -n $found ]] || die "$lib is in none of the wheels of images/cuda-wheels.txt"
        cp "$found" "$dest/$CUDA_DIR/$lib"
        chmod 0755 "$dest/$CUDA_DIR/$lib"
    done
}

# The release profile keeps line tables (debug = "line-tables-only"), which make the binaries
# ~135 MB; the images drop them (--strip-debug keeps the symbols, so backtraces still name the
# functions). IMAGE_STRIP=0 keeps them.
install_binary() {
    local from=$1 to=$2
    mkdir -p "$(dirname "$to")"
    if [[ ${IMAGE_STRIP:-1} == 1 ]]; then
        strip --strip-debug -o "$to" "$from"
        chmod 0755 "$to"
    else
        install -m 0755 "$from" "$to"
    fi
}

context() {
    local daemon=$RELEASE/skillkv operator=$RELEASE/skillkv-operator
    [[ -x $daemon && -x $operator ]] ||
        die "release binaries missing in $RELEASE; run: cargo build --release -p skillkv-daemon -p skillkv-operator --bins --features skillkv-daemon/cuda"
    command -v busybox >/dev/null || die "busybox not found (Debian: apt-get install busybox-static)"
    command -v curl >/dev/null || die "curl not found"
    busybox --list | grep -qx sha256sum || die "$(command -v busybox) has no sha256sum applet"
    if ldd "$(command -v busybox)" >/dev/null 2>&1; then
        die "$(command -v busybox) is dynamically linked; install busybox-static"
    fi

    local ctx=$WORK/context
    rm -rf "$ctx"
    mkdir -p "$ctx"

    # Operator: the binary and its libraries.
    local op=$ctx/operator
    skeleton "$op/runtime"
    home_layer "$op/home"
    SKIP_IN=() SKIP_NAMES=()
    copy_libs "$op/runtime" "$operator"
    install_binary "$operator" "$op/bin/usr/local/bin/skillkv-operator"

    # Daemon: the CUDA libraries first, so the runtime layer can hold what they need too.
    local dm=$ctx/daemon
    cuda_libs "$dm/cuda"
    skeleton "$dm/runtime"
    home_layer "$dm/home"
    SKIP_IN=() SKIP_NAMES=("${CUDA_LIBS[@]}")
    LIBRARY_PATH_EXTRA=$dm/cuda/$CUDA_DIR copy_libs "$dm/runtime" "$daemon" "$dm/cuda/$CUDA_DIR"/*
    SKIP_IN=("$dm/runtime")
    mkdir -p "$dm/tools/usr/bin"
    copy_libs "$dm/tools" "$(command -v curl)"
    cp -L --preserve=mode "$(command -v curl)" "$dm/tools/usr/bin/curl"
    cp -L --preserve=mode "$(command -v busybox)" "$dm/tools/usr/bin/busybox"
    local applet
    for applet in "${APPLETS[@]}"; do
        ln -sfn busybox "$dm/tools/usr/bin/$applet"
    done
    install_binary "$daemon" "$dm/bin/usr/local/bin/skillkv"

    # Skill detection's embeddings, in both images: the router and the daemons detect alike.
    local embeddings=$WORK/detector-embeddings layer
    SKILLKV_DETECTOR_EMBEDDINGS=$embeddings scripts/fetch-detector-embeddings.sh >&2
    for layer in "$op/detector" "$dm/detector"; do
        mkdir -p "$layer/$DETECTOR_DIR"
        cp "$embeddings"/{tokenizer.json,embeddings.safetensors,LICENSE} "$layer/$DETECTOR_DIR/"
    done

    echo "images: build contexts in $ctx (sizes of the layers):"
    du -sh "$op"/* "$dm"/* | sed "s|$ctx/||"
}

build_one() {
    local name=$1 containerfile=$2 ctx=$3 version=$4 rev=$5 created=$6
    # Labels that change with every build go on the command line, not into the Containerfile:
    # buildah's layer cache does not key a LABEL step on the build arguments it expands.
    "${BUILDAH[@]}" bud --isolation chroot --layers \
        --label org.opencontainers.image.version="$version" \
        --label org.opencontainers.image.revision="$rev" \
        --label org.opencontainers.image.created="$created" \
        -f "$containerfile" -t "$name:$version" -t "$name:$version-$rev" "$ctx"
}

build() {
    command -v buildah >/dev/null || die "buildah not found (Debian: apt-get install buildah)"
    check
    context
    local version rev created
    version=$(crate_version)
    rev=$(revision)
    created=$(git log -1 --format=%cI)
    build_one "$(operator_image)" images/operator.Containerfile "$WORK/context/operator" "$version" "$rev" "$created"
    build_one "$(daemon_image)" images/daemon.Containerfile "$WORK/context/daemon" "$version" "$rev" "$created"
    echo "images: built (tags $version and $version-$rev):"
    "${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}}  {{.Size}}' |
        grep -E "^($(daemon_image)|$(operator_image)):$version " || true
}

case ${1:-build} in
    check) check ;;
    context) context ;;
    build) build ;;
    version) echo "$(crate_version) $(revision)" ;;
    *) die "usage: scripts/images.sh [check|context|build|version]" ;;
esac
