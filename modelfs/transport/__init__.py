"""The cluster's signed HTTP: request tokens made from the shared secret, and the small server
that checks them before it reads a body. The peer server and the scheduler both serve with it;
their clients sign with it."""
