"""Images and training data: decoding and preprocessing, generated views, training tuples, training sets, the bundled samples."""
