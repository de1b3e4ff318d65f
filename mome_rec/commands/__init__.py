"""Sub-commands of ``mome-rec`` beyond train and convert, one module each."""
