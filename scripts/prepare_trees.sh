# Sourced by scripts/train_trees.sh and scripts/train_tree_model.sh: the data with class maps
# (portal vein 1, hepatic veins 2), each stage through the project's commands and reused when
# complete. Needs PY and step(); sets the settings both scripts share from the environment (REAL_SRC,
# DATA from TREES_DATA, CKPT from TREES_CKPT, MIX from MIX_REAL), PH, REAL (dataset names), HEAD
# (the fitted salience head), HAVE_REAL (1 when real patients were found under REAL_SRC) and the
# function salience_maps DATASET LIST_DIR (a dataset's maps from that head, as the vessel models read them).
#   a. scripts/prepare_phantom.sh: the make-demo phantoms and the bank head fitted on them.
#   b. preprocess.py --vessel_classes portalvein,venoussystem on the same phantoms, with make
#      demo's split (so the test cases are the binary demo model's), and their maps.
#   c. the real patients under REAL_SRC with their class maps and maps from the same head; their
#      lists: $DATA/lists/all (every patient in vol_train) and $DATA/lists/test_real (in vol_test).
if [ -z "${REAL_SRC+x}" ]; then
  REAL_SRC=$([ -d ../shared/real ] && echo ../shared/real || echo "")
fi
DATA=${TREES_DATA:-data/trees}
CKPT=${TREES_CKPT:-checkpoint/trees}
MIX=${MIX_REAL:-0}
HEAD=${DEMO_CKPT:-checkpoint}/salience/fixed/phantom/bank_fit.pth
CLASSES=portalvein,venoussystem
PH=phantom_trees
REAL=ircadb_trees

salience_maps() {  # dataset list_dir
  $PY salience_generation.py --dataset "$1" --root_path "$DATA" --list_dir "$2" --generator bank \
      --weights "$HEAD" --normalisation fixed >&2
}

step "data a. phantoms and the fitted head (scripts/prepare_phantom.sh)"
DEMO_NORMALISATION=fixed bash scripts/prepare_phantom.sh >&2

step "data b. the phantoms with a class map -> $DATA/$PH (make demo's split)"
mkdir -p "$DATA/lists/$PH"
for s in train val test; do cp "list/phantom/vol_$s.txt" "$DATA/lists/$PH/vol_$s.txt"; done
$PY preprocess.py --dataset $PH --src "${DEMO_DATA:-data}/raw/phantom" --root_path "$DATA" --list_dir "$DATA/lists" \
    --vessel_classes $CLASSES --workers 2 >&2
salience_maps $PH "$DATA/lists"

HAVE_REAL=0
if [ -n "$REAL_SRC" ] && ls -d "$REAL_SRC"/3Dircadb1.* >/dev/null 2>&1; then
  HAVE_REAL=1
  step "data c. real patients under $REAL_SRC with their class maps"
  $PY preprocess.py --dataset $REAL --src "$REAL_SRC" --root_path "$DATA" --list_dir "$DATA/lists/all" \
      --vessel_classes $CLASSES --workers 2 --split 100/0/0 >&2
  salience_maps $REAL "$DATA/lists/all"
  mkdir -p "$DATA/lists/test_real/$REAL"
  cp "$DATA/lists/all/$REAL/vol_train.txt" "$DATA/lists/test_real/$REAL/vol_test.txt"
  : > "$DATA/lists/test_real/$REAL/vol_train.txt"
  : > "$DATA/lists/test_real/$REAL/vol_val.txt"
else
  step "data c. no real patient under '${REAL_SRC}'"
fi
