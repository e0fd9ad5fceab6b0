"""Media from and to the outside: the URL fetcher (SSRF-checked) and the store of generated
files."""
