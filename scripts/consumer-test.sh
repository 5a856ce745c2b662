#!/usr/bin/env bash
# The installed library as a user meets it: `meson install` into a temporary prefix, then, with
# only that prefix's pkg-config file,
#   - the header compiles alone as C99 and C++11 with -pedantic -Werror;
#   - the README's C example and tests/consumer/consumer.cpp build and run against the shared
#     library (pkg-config --cflags --libs dmattn) and the static one (pkg-config --static);
#   - the statically linked programs do not need libdmattn.so.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix
meson setup "$tmp/build" --buildtype=release --prefix="$prefix" --libdir=lib -Dtests=disabled \
  >"$tmp/setup.log" 2>&1 || { cat "$tmp/setup.log"; exit 1; }
ninja -C "$tmp/build" >/dev/null
meson install -C "$tmp/build" >/dev/null
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
pkg-config --exists dmattn || { echo "consumer: no dmattn.pc under $prefix" >&2; exit 1; }
cflags=$(pkg-config --cflags dmattn)

printf '#include <dmattn.h>\n' >"$tmp/header.c"
cc -std=c99 -pedantic -Wall -Wextra -Werror $cflags -fsyntax-only "$tmp/header.c"
c++ -std=c++11 -pedantic -Wall -Wextra -Werror $cflags -fsyntax-only -x c++ "$tmp/header.c"
echo "consumer: dmattn.h compiles alone as C99 and C++11 (-pedantic -Werror)"

awk '/^```c$/{on=1; next} /^```$/{if(on){exit}} on' README.md >"$tmp/example.c"
[ -s "$tmp/example.c" ] || { echo "README.md has no \`\`\`c block" >&2; exit 1; }
for kind in shared static; do
  if [ $kind = shared ]; then
    libs=$(pkg-config --libs dmattn)
    link=(-Wl,-rpath,"$prefix/lib")
  else
    # the archive itself, then what pkg-config --static says it needs
    libs="$prefix/lib/libdmattn.a $(pkg-config --static --libs dmattn | sed 's/-ldmattn//')"
    link=()
  fi
  # (the example itself calls libm)
  cc -std=c11 -Wall -Wextra -Werror $cflags "$tmp/example.c" -o "$tmp/example-$kind" $libs -lm \
    "${link[@]}"
  c++ -std=c++11 -Wall -Wextra -Werror $cflags tests/consumer/consumer.cpp \
    -o "$tmp/consumer-$kind" $libs "${link[@]}"
  if [ $kind = static ] && ldd "$tmp/consumer-$kind" | grep -q libdmattn; then
    echo "consumer: the static build still loads libdmattn.so" >&2; exit 1
  fi
  echo "consumer: $kind: README example"
  "$tmp/example-$kind" | sed 's/^/  /'
  "$tmp/consumer-$kind"
done
