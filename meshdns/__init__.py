"""meshdns: a sidecar-local DNS resolver for service-mesh names."""

__version__ = "0.1.0"
