"""Fetching before the reader asks: the window ahead of a sequential reader and the hints of
what a loader reads first (``prefetcher``), built-in hints (``hints``, pure) and recorded read
profiles (``profile``). It only plans and starts fetches; the piece fetcher does them."""
