"""The registry: the source of truth for Services, Pods, Nodes and EndpointSlices."""
