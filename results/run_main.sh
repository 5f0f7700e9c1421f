#!/usr/bin/env bash
# Table "main" (paper Tables 1-4 analogue): STL + all 26 registry methods on adult, full recipe, 3 seeds.
set -u
cd "$(dirname "$0")/.."
dbmtl-jax run adult --methods all --seeds 3 --out results/adult_main --no-progress
dbmtl-jax report results/adult_main > /dev/null
