# shellcheck shell=bash
# Corpus locations of egs/spokencoco (read by local/data.sh). Set them in the environment to override:
#   SPOKENCOCO=/data/spokencoco MSCOCO=/data/coco KARPATHY_SPLIT=/data/coco/dataset_coco.json ./run.sh
# Relative paths are taken from the recipe dir.
SPOKENCOCO=${SPOKENCOCO:-downloads/spokencoco}        # holds SpokenCOCO/ (SpokenCOCO.tar.gz unpacked)
MSCOCO=${MSCOCO:-downloads/mscoco}                    # holds train2014/ and val2014/ (the COCO 2014 zips)
KARPATHY_SPLIT=${KARPATHY_SPLIT:-downloads/dataset_coco.json}  # Karpathy split (caption_datasets.zip)
