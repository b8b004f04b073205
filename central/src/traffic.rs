//! Traffic simulator for the dev fleet (`outpost-central dev traffic`).
