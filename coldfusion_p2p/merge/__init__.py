"""How bodies become the next base: reducer-side merges (clipped mean, TIES) and fusion rules
(outer optimizer, anchor). Pure tensor code, shared by the swarm and the simulator."""
