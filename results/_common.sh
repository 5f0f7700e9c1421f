# Shared by results/run_*.sh: reuse identical finished runs (same config hash) from results/adult_main,
# so a table directory is self-contained without retraining them. Missing files are simply trained.
reuse_from_main() {  # reuse_from_main DEST_DIR LABEL...
  local dest="$1"; shift
  mkdir -p "$dest/adult"
  for label in "$@"; do
    for f in results/adult_main/adult/adult__"${label}"__seed*.json; do
      [ -e "$f" ] && cp -n "$f" "$dest/adult/"
    done
  done
  return 0
}

# reuse_runs SRC_DIR DEST_DIR BENCHMARK LABEL...: the same, from any results directory and benchmark.
reuse_runs() {
  local src="$1" dest="$2" bench="$3"; shift 3
  mkdir -p "$dest/$bench"
  for label in "$@"; do
    for f in "$src/$bench/${bench}__${label}__seed"*.json; do
      [ -e "$f" ] && cp -n "$f" "$dest/$bench/"
    done
  done
  return 0
}
