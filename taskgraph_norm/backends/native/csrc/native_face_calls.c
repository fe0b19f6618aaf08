/* The two C faces' calls (backends/native/face.py): LayerNorm's layer_face and RMSNorm's
 * rms_face, once native_face.c's checks (tgn_face_of) have found the call's plan.  Each
 * runs the same kernel entry with the same arguments as the Python warm path
 * (backends/native/layer_direct.py's tgn_layer_rows, direct.py's tgn_rows_call), so the
 * same bits; anything it cannot take returns None having done nothing. */
#include "native_face.h"
#include "tgn_native.h"

#include <string.h>

/* A LayerNorm plan's fixed arguments of tgn_layer_rows (layer_face_config packs them;
 * the `adds` address must outlive the bytes: face.py keeps their owner beside them). */
typedef struct {
    int64_t hidden, chunk, n_adds, root, exact, grain;
    const int64_t *adds;
} layer_cfg_t;

/* layer_face_config(hidden, chunk, adds, n_adds, root, exact, grain): the bytes of a layer_cfg_t. */
PyObject *tgn_py_layer_face_config(PyObject *self, PyObject *args)
{
    (void)self;
    layer_cfg_t c;
    PyObject *adds;
    memset(&c, 0, sizeof c);
    if (!PyArg_ParseTuple(args, "LLOLLLL:layer_face_config", &c.hidden, &c.chunk, &adds, &c.n_adds, &c.root,
                          &c.exact, &c.grain))
        return NULL;
    c.adds = (const int64_t *)PyLong_AsVoidPtr(adds);
    if (!c.adds && PyErr_Occurred())
        return NULL;
    if (c.hidden < 1 || c.chunk < 1 || c.grain < 1) {
        PyErr_SetString(PyExc_ValueError, "layer_face_config(): hidden, chunk and grain must be at least 1");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)&c, sizeof c);
}

/* The call once its plan c is known (x's view xv): y, or NULL (nothing done). */
static PyObject *run_layer(const layer_cfg_t *c, const tgn_view_t *xv, PyObject *x, PyObject *w, PyObject *b,
                           PyObject *eps)
{
    const int64_t hidden = c->hidden;
    /* the weight and bias: (hidden,), CPU, contiguous, x's dtype or fp32 with a half x, one dtype */
    PyObject *ps[2] = {w, b};
    void *pp[2] = {NULL, NULL};
    int64_t p_code = -1;
    tgn_view_t pv;
    for (int j = 0; j < 2; ++j) {
        if (ps[j] == Py_None)
            continue;
        if (!tgn_face_view(ps[j], &pv) || pv.ndim != 1 || pv.dims[0] != hidden || (p_code >= 0 && pv.code != p_code))
            return NULL;
        p_code = pv.code;
        pp[j] = pv.data;
    }
    int64_t w_code = xv->code;
    if (p_code >= 0 && p_code != xv->code) {
        if (p_code != TGN_DTYPE_F32 || xv->code == TGN_DTYPE_F32)
            return NULL;
        w_code = TGN_DTYPE_F32;
    }
    void *yp;
    PyObject *y = tgn_face_fresh(x, &yp);
    if (!y)
        return NULL;
    /* (the GIL held: fewer than TGN_SPLIT_NUMEL elements on one thread) */
    const double e = eps == Py_None ? tgn_face.layer_eps : PyFloat_AS_DOUBLE(eps);
    const int64_t bad = tgn_layer_rows(xv->data, yp, xv->numel / hidden, hidden, c->chunk, c->adds, c->n_adds,
                                       c->root, c->exact, pp[0], pp[1], e, NULL, NULL, xv->code, w_code, c->grain, 1);
    if (bad) { /* a NaN row (or an exact row left to torch ops), or no scratch: the Python path */
        Py_DECREF(y);
        return NULL;
    }
    return y;
}

/* layer_face(by_config, x, weight, bias, eps, chunk_size, topology, leaf, accumulate,
 * executor): LayerNorm's y, or None (nothing done).  by_config: pipeline/layer.py's
 * cache of pipelines, whose `face` attribute holds layer_face_config's bytes once the
 * plan has run natively (None before). */
PyObject *tgn_py_layer_face(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "layer_face() takes 10 arguments");
        return NULL;
    }
    PyObject *x = args[1], *w = args[2], *b = args[3], *eps = args[4], *pipe, *cfg;
    tgn_view_t xv;
    if (!tgn_face_of(args[0], x, w, b, eps, args + 5, 5, TGN_SPLIT_NUMEL, &xv, &pipe, &cfg))
        Py_RETURN_NONE;
    const int64_t hidden = xv.dims[xv.ndim - 1];
    PyObject *y = NULL;
    if (PyBytes_CheckExact(cfg) && PyBytes_GET_SIZE(cfg) == (Py_ssize_t)sizeof(layer_cfg_t)) {
        layer_cfg_t c;
        memcpy(&c, PyBytes_AS_STRING(cfg), sizeof c);
        y = c.hidden == hidden ? run_layer(&c, &xv, x, w, b, eps) : NULL;
    }
    PyErr_Clear();
    Py_DECREF(cfg); /* (cfg and the pipeline held across the call: they hold the plan c.adds points into) */
    Py_DECREF(pipe);
    if (!y)
        Py_RETURN_NONE;
    return y;
}

/* The call once the pipeline's face (a dict: x's code * 4 + the weight's code + 1, 0 for
 * no weight -> rows_config's bytes, for the dtype pairs whose output is x's dtype) is
 * known: y (out, when given), or NULL (nothing done).  A call of TGN_SPLIT_NUMEL
 * elements or more shares its rows among team.threads(numel) threads with the GIL released,
 * as direct.py's routed call. */
static PyObject *run_rms(PyObject *faces, const tgn_view_t *xv, PyObject *x, PyObject *w, PyObject *eps, PyObject *out)
{
    const int64_t hidden = xv->dims[xv->ndim - 1];
    tgn_view_t wv;
    wv.data = NULL;
    wv.code = -1;
    if (w != Py_None && (!tgn_face_view(w, &wv) || wv.ndim != 1 || wv.dims[0] != hidden))
        return NULL;
    PyObject *key = PyLong_FromLongLong(xv->code * 4 + wv.code + 1);
    PyObject *cfg = key ? PyDict_GetItemWithError(faces, key) : NULL; /* borrowed */
    Py_XDECREF(key);
    if (!cfg || !PyBytes_CheckExact(cfg) || PyBytes_GET_SIZE(cfg) != (Py_ssize_t)sizeof(tgn_rows_cfg_t))
        return NULL;
    tgn_rows_cfg_t c;
    memcpy(&c, PyBytes_AS_STRING(cfg), sizeof c);
    if (c.hidden != hidden || c.x_dtype != xv->code || c.y_dtype != xv->code ||
        (wv.code >= 0 && c.w_dtype != wv.code))
        return NULL;
    double e;
    if (eps == Py_None) { /* the dtype's default, once a cold call has filled it in */
        PyObject *d = PyDict_GetItemWithError(tgn_face.default_eps, tgn_face.dtypes[xv->code]); /* borrowed */
        if (!d || !PyFloat_CheckExact(d))
            return NULL;
        e = PyFloat_AS_DOUBLE(d);
    } else {
        e = PyFloat_AS_DOUBLE(eps);
    }
    const int64_t rows = xv->numel / hidden, large = xv->numel >= TGN_SPLIT_NUMEL;
    int64_t threads = 1;
    if (large && rows > c.grain) {
        PyObject *n = PyLong_FromLongLong(xv->numel), *t = n ? PyObject_CallOneArg(tgn_face.threads, n) : NULL;
        Py_XDECREF(n);
        threads = t && PyLong_Check(t) ? PyLong_AsLongLong(t) : -1;
        Py_XDECREF(t);
        if (threads < 1)
            return NULL;
    }
    void *yp;
    int64_t mapped, bad;
    PyObject *y = tgn_face_output(out, x, xv, xv->numel * (xv->code == TGN_DTYPE_F32 ? 4 : 2), &wv,
                                  hidden * (wv.code == TGN_DTYPE_F32 ? 4 : 2), &yp, &mapped);
    if (!y)
        return NULL;
    if (large) {
        Py_BEGIN_ALLOW_THREADS
        bad = tgn_rows_call(&c, xv->data, yp, rows, wv.data, e, NULL, NULL, NULL, threads, mapped);
        Py_END_ALLOW_THREADS
    } else { /* a few us: the GIL held */
        bad = tgn_rows_call(&c, xv->data, yp, rows, wv.data, e, NULL, NULL, NULL, threads, mapped);
    }
    if (bad) {
        Py_DECREF(y); /* a NaN total or result (or an exact row with no scale): the Python path */
        return NULL;
    }
    return y;
}

/* rms_face(by_config, x, weight, eps, chunk_size, topology, leaf, accumulate, executor,
 * casting_mode, offset, out, large): RMSNorm's y (out, when given), or None (nothing
 * done).  by_config: pipeline/cache.py's cache of pipelines, whose `face` attribute is
 * the direct call's dict of configurations once the plan has run natively (None
 * before).  large: calls of TGN_SPLIT_NUMEL elements or more are taken too (the async
 * face leaves them to a worker thread). */
PyObject *tgn_py_rms_face(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "rms_face() takes 13 arguments");
        return NULL;
    }
    PyObject *x = args[1], *w = args[2], *eps = args[3], *pipe, *faces;
    tgn_view_t xv;
    const int64_t limit = args[12] == Py_True ? INT64_MAX : TGN_SPLIT_NUMEL;
    if (!tgn_face_of(args[0], x, w, Py_None, eps, args + 4, 7, limit, &xv, &pipe, &faces))
        Py_RETURN_NONE;
    PyObject *y = PyDict_CheckExact(faces) ? run_rms(faces, &xv, x, w, eps, args[11]) : NULL;
    PyErr_Clear();
    Py_DECREF(faces); /* (held across the call: they hold the plan c.adds points into) */
    Py_DECREF(pipe);
    if (!y)
        Py_RETURN_NONE;
    return y;
}
