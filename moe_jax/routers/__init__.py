"""Router families. Each turns router logits into a `RoutingDecision` (index form) or, for soft
routers, into dense dispatch/combine weights. `moe_jax.routing.route` picks one by config."""
