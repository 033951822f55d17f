"""EasyDict, the cache folder and open_url: the names NVIDIA's pickles and network code take from
``dnnlib.util``."""
import hashlib
import io
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

CACHE_DIR_VARIABLE = "DNNLIB_CACHE_DIR"
DOWNLOAD_TIMEOUT_SECONDS = 60
SCHEME_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class EasyDict(dict):
    """A dict whose items are also attributes: ``d.name`` is ``d['name']``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            # AttributeError, not KeyError, so that getattr(d, name, default), copy and pickle work.
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


def make_cache_dir_path(*paths):
    """A path inside dnnlib's cache folder: $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib, else one in the
    system's temporary folder."""
    if os.environ.get(CACHE_DIR_VARIABLE):
        root = os.environ[CACHE_DIR_VARIABLE]
    elif os.environ.get("HOME"):
        root = os.path.join(os.environ["HOME"], ".cache", "dnnlib")
    elif os.environ.get("USERPROFILE"):
        root = os.path.join(os.environ["USERPROFILE"], ".cache", "dnnlib")
    else:
        root = os.path.join(tempfile.gettempdir(), ".cache", "dnnlib")
    return os.path.join(root, *paths)


def open_url(url, cache_dir=None, num_attempts=10, verbose=True, return_filename=False, cache=True):
    """Opens a local path, a ``file://`` URL or an ``http(s)://`` URL for binary reading.

    Downloads are kept in ``cache_dir`` (default ``make_cache_dir_path('downloads')``) under the MD5
    of the URL, and a cached copy is used instead of downloading again. Returns a binary file
    object, or with ``return_filename=True`` the local file's path (which needs ``cache=True``).
    """
    if num_attempts < 1:
        raise ValueError(f"num_attempts must be >= 1, got {num_attempts}")
    if return_filename and not cache:
        raise ValueError("return_filename=True needs cache=True: an uncached download has no file name")
    match = SCHEME_PATTERN.match(url)
    scheme = match.group(1).lower() if match else None
    if scheme is None or scheme == "file":
        path = url if scheme is None else urllib.request.url2pathname(urllib.parse.urlparse(url).path)
        return path if return_filename else open(path, "rb")
    if scheme not in ("http", "https"):
        raise ValueError(f"cannot open {url}: only local paths, file:// and http(s):// URLs are supported")

    cache_dir = cache_dir or make_cache_dir_path("downloads")
    url_key = hashlib.md5(url.encode("utf-8")).hexdigest()
    if cache:
        cached = _cached_download(cache_dir, url_key)
        if cached is not None:
            return cached if return_filename else open(cached, "rb")
    data = _download(url, num_attempts, verbose)
    if not cache:
        return io.BytesIO(data)
    path = _store_download(cache_dir, url_key, url, data)
    return path if return_filename else io.BytesIO(data)


def _cached_download(cache_dir, url_key):
    if not os.path.isdir(cache_dir):
        return None
    names = sorted(name for name in os.listdir(cache_dir) if name.startswith(url_key + "_"))
    return os.path.join(cache_dir, names[0]) if names else None


def _download(url, num_attempts, verbose):
    if verbose:
        print(f"Downloading {url} ...", file=sys.stderr, flush=True)
    for attempt in range(1, num_attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
                data = response.read()
            if not data:
                raise OSError("the server sent an empty file")
            return data
        except urllib.error.HTTPError as error:
            if 400 <= error.code < 500:  # the request itself is wrong: retrying cannot help
                raise OSError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
            last_error = error
        except OSError as error:  # URLError, timeouts and connection resets are OSErrors
            last_error = error
        if attempt < num_attempts:
            time.sleep(min(2 ** (attempt - 1), 30))
    raise OSError(f"cannot download {url} after {num_attempts} attempts: {last_error}")


def _store_download(cache_dir, url_key, url, data):
    """Writes data into the cache atomically (temporary file, then rename), so an interrupted
    download never leaves a truncated file that later calls would take for a complete one."""
    os.makedirs(cache_dir, exist_ok=True)
    base_name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    safe_name = re.sub(r"[^0-9A-Za-z._-]", "_", base_name)[:128]
    path = os.path.join(cache_dir, f"{url_key}_{safe_name}")
    handle, temp_path = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise
    return path
