# shellcheck shell=bash
# Corpus location of egs/flickr8k (read by local/data.sh). Set it in the environment to override:
#   FLICKR8K=/data/flickr8k ./run.sh
# FLICKR8K = the folder where Flickr8k_Dataset.zip, Flickr8k_text.zip and flickr_audio.tar.gz were unpacked
# side by side (it holds Flicker8k_Dataset/, Flickr8k.token.txt, Flickr_8k.*Images.txt and flickr_audio/).
# A relative path is taken from the recipe dir.
FLICKR8K=${FLICKR8K:-downloads/flickr8k}
