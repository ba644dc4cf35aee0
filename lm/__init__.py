"""The library: everything a stage computes (model, training loop, data, curation, compression). It never imports
stages/: a stage is a thin function of its params over these modules."""
