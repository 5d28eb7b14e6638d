"""The optimizers' state: where each block and parameter lives (:mod:`.layout`) and the
flat buffers that hold it (:mod:`.arena`)."""
