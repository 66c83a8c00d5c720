"""Images and training data: `preprocess` (decode, resize for the model), `views` (generated
nuisance views), `tuples` (hard-negative training tuples), `training_sets` (labelled layouts
and view families), `samples` (the bundled sample photos and altered queries)."""
