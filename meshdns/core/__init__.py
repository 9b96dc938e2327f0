"""Pure core: bytes in, bytes out. Only the standard library and dnslib."""
