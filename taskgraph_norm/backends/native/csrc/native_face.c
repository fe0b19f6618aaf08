/* The functional faces' warm call in C (backends/native/face.py): a short call that
 * ops.route sends straight to the kernel, checked and run in one C call, for LayerNorm
 * (layer_face) and RMSNorm (rms_face).
 *
 * On a (1, 4096) row the kernel takes about 1 us, and the Python checks before it
 * (route, the tensors' dtype, device, layout, shape and address, one attribute each)
 * took longer than the kernel.  Here a tensor's metadata comes from one call,
 * torch._C._to_dlpack (the DLPack capsule's DLTensor: address, device, dtype, shape,
 * strides), ops.route's checks are the same calls ops/routing.py makes, and the kernel
 * is the same entry with the same arguments as the Python warm path's
 * (backends/native/layer_direct.py's tgn_layer_rows, direct.py's tgn_rows_call), so the
 * same bits.  The kernel runs with the GIL
 * held: a face call is below TGN_SPLIT_NUMEL elements, a few us.
 *
 * Anything else returns None having done nothing, and the face runs its Python path
 * (with its errors): a tensor subclass, a tracer, a dispatch mode, a torch.func
 * transform, forward AD, a gradient to record, another device or dtype, strides,
 * `out`, a context that does not allow native C or names Triton, TGN_SPLIT_NUMEL
 * elements or more, a configuration not yet run natively, a row the kernel leaves to
 * torch ops.  The DLPack structs are the legacy ABI (dlpack.h v0.x), the one
 * torch._C._to_dlpack's "dltensor" capsule has held since DLPack's first version. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "tgn_native.h"

typedef struct {
    void *data;
    int32_t device_type, device_id;
    int32_t ndim;
    uint8_t code, bits;
    uint16_t lanes;
    int64_t *shape, *strides;
    uint64_t byte_offset;
} dl_tensor_t;

typedef struct {
    dl_tensor_t t;
    void *manager_ctx;
    void (*deleter)(void *);
} dl_managed_t;

enum { DL_CPU = 1, DL_FLOAT = 2, DL_BFLOAT = 4, MAX_DIMS = 8 };

/* A LayerNorm plan's fixed arguments of tgn_layer_rows (layer_face_config packs them;
 * the `adds` address must outlive the bytes: face.py keeps their owner beside them). */
typedef struct {
    int64_t hidden, chunk, n_adds, root, exact, grain;
    const int64_t *adds;
} layer_cfg_t;

/* What face_setup hands over once (new references). */
static struct {
    PyObject *tensor, *parameter, *empty_like, *to_dlpack, *dispatch_len, *tracing_state, *functorch_active,
        *grad_enabled, *forward_ad, *allowed, *triton_asked, *default_eps, *dtypes[3];
    PyObject *native, *requires_grad, *level, *data_ptr, *face;
    double layer_eps;
    int ready;
} F;

PyObject *tgn_py_face_setup(PyObject *self, PyObject *args)
{
    (void)self;
    enum { N = 15 };
    PyObject *o[N];
    double eps;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOOOd:face_setup", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                          &o[7], &o[8], &o[9], &o[10], &o[11], &o[12], &o[13], &o[14], &eps))
        return NULL;
    if (!PyContextVar_CheckExact(o[9]) || !PyContextVar_CheckExact(o[10]) || !PyDict_CheckExact(o[11])) {
        PyErr_SetString(PyExc_TypeError,
                        "face_setup(): the backends' context variables must be ContextVars, default_eps a dict");
        return NULL;
    }
    PyObject **slots[N] = {&F.tensor,       &F.parameter,     &F.empty_like,       &F.to_dlpack,
                           &F.dispatch_len, &F.tracing_state, &F.functorch_active, &F.grad_enabled,
                           &F.forward_ad,   &F.allowed,       &F.triton_asked,     &F.default_eps,
                           &F.dtypes[TGN_DTYPE_F32], &F.dtypes[TGN_DTYPE_BF16], &F.dtypes[TGN_DTYPE_F16]};
    const char *names[] = {"native", "requires_grad", "_current_level", "data_ptr", "face"};
    PyObject **interned[] = {&F.native, &F.requires_grad, &F.level, &F.data_ptr, &F.face};
    for (int k = 0; k < 5; ++k)
        if (!*interned[k] && !(*interned[k] = PyUnicode_InternFromString(names[k])))
            return NULL;
    for (int k = 0; k < N; ++k) {
        Py_INCREF(o[k]);
        Py_XSETREF(*slots[k], o[k]);
    }
    F.layer_eps = eps;
    F.ready = 1;
    Py_RETURN_NONE;
}

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

/* 1 when o is Py_True, 0 when Py_False, -1 for anything else or an error (cleared); steals o. */
static int truth(PyObject *o)
{
    const int r = o == Py_True ? 1 : o == Py_False ? 0 : -1;
    if (!o)
        PyErr_Clear();
    Py_XDECREF(o);
    return r;
}

static int plain(PyObject *t)
{
    return (PyObject *)Py_TYPE(t) == F.tensor || (PyObject *)Py_TYPE(t) == F.parameter;
}

/* ops.route(x, w, b) == DIRECT (a tracer, a dispatch mode, a torch.func transform,
 * forward AD or a gradient to record: not), and the backends' context lets native C
 * run (not triton_asked(), "native" in allowed()).  The caller checked the types and
 * that nothing compiles. */
static int direct(PyObject *x, PyObject *w, PyObject *b)
{
    PyObject *n = PyObject_CallNoArgs(F.dispatch_len);
    const long modes = n ? PyLong_AsLong(n) : -1;
    Py_XDECREF(n);
    PyObject *tracing = PyObject_CallNoArgs(F.tracing_state);
    const int traced = tracing != Py_None;
    Py_XDECREF(tracing);
    PyObject *level = PyObject_GetAttr(F.forward_ad, F.level);
    const long lv = level ? PyLong_AsLong(level) : 0;
    Py_XDECREF(level);
    if (PyErr_Occurred() || modes != 0 || traced || lv >= 0 || truth(PyObject_CallNoArgs(F.functorch_active)) != 0) {
        PyErr_Clear();
        return 0;
    }
    const int grad = truth(PyObject_CallNoArgs(F.grad_enabled));
    if (grad < 0)
        return 0;
    PyObject *ts[3] = {x, w, b};
    for (int k = 0; grad && k < 3; ++k)
        if (ts[k] != Py_None && truth(PyObject_GetAttr(ts[k], F.requires_grad)) != 0)
            return 0;
    PyObject *v = NULL;
    if (PyContextVar_Get(F.triton_asked, NULL, &v) < 0 || v != Py_False) {
        Py_XDECREF(v);
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(v);
    if (PyContextVar_Get(F.allowed, NULL, &v) < 0 || !v) {
        PyErr_Clear();
        return 0;
    }
    const int in = PySequence_Contains(v, F.native);
    Py_DECREF(v);
    if (in < 0)
        PyErr_Clear();
    return in == 1;
}

/* A plain tensor's metadata: a CPU, contiguous tensor of fp32 (code TGN_DTYPE_F32),
 * bf16 or fp16 with at most MAX_DIMS dims, or 0 (the error, if any, cleared). */
typedef struct {
    char *data;
    int64_t code, ndim, numel, dims[MAX_DIMS];
} view_t;

static int view(PyObject *t, view_t *v)
{
    PyObject *cap = PyObject_CallOneArg(F.to_dlpack, t);
    dl_managed_t *m = cap ? (dl_managed_t *)PyCapsule_GetPointer(cap, "dltensor") : NULL;
    int ok = 0;
    if (m && m->t.device_type == DL_CPU && m->t.lanes == 1 && m->t.ndim >= 0 && m->t.ndim <= MAX_DIMS) {
        const dl_tensor_t *d = &m->t;
        v->code = d->code == DL_FLOAT && d->bits == 32   ? TGN_DTYPE_F32
                  : d->code == DL_BFLOAT && d->bits == 16 ? TGN_DTYPE_BF16
                  : d->code == DL_FLOAT && d->bits == 16  ? TGN_DTYPE_F16
                                                          : -1;
        v->ndim = d->ndim;
        v->numel = 1;
        int64_t expect = 1; /* torch's is_contiguous: sizes of 1 may have any stride */
        int dense = 1;
        for (int64_t k = d->ndim - 1; k >= 0; --k) {
            v->dims[k] = d->shape[k];
            v->numel *= d->shape[k];
            if (d->shape[k] != 1) {
                dense = dense && (!d->strides || d->strides[k] == expect);
                expect *= d->shape[k];
            }
        }
        ok = v->code >= 0 && (dense || v->numel == 0);
        v->data = (char *)d->data + d->byte_offset;
    }
    if (!m)
        PyErr_Clear();
    Py_XDECREF(cap); /* (the capsule's destructor frees the DLManagedTensor) */
    return ok;
}

/* A fresh tensor like x (torch.empty_like) and its address, or NULL (error cleared). */
static PyObject *fresh_like(PyObject *x, void **at)
{
    PyObject *y = PyObject_CallOneArg(F.empty_like, x);
    PyObject *p = y ? PyObject_CallMethodNoArgs(y, F.data_ptr) : NULL;
    *at = p ? PyLong_AsVoidPtr(p) : NULL;
    Py_XDECREF(p);
    if (!*at) {
        PyErr_Clear();
        Py_CLEAR(y);
    }
    return y;
}

/* The call once its plan c is known (x's view xv): y, or NULL (nothing done). */
static PyObject *run_layer(const layer_cfg_t *c, const view_t *xv, PyObject *x, PyObject *w, PyObject *b,
                           PyObject *eps)
{
    const int64_t hidden = c->hidden;
    /* the weight and bias: (hidden,), CPU, contiguous, x's dtype or fp32 with a half x, one dtype */
    PyObject *ps[2] = {w, b};
    void *pp[2] = {NULL, NULL};
    int64_t p_code = -1;
    view_t pv;
    for (int j = 0; j < 2; ++j) {
        if (ps[j] == Py_None)
            continue;
        if (!view(ps[j], &pv) || pv.ndim != 1 || pv.dims[0] != hidden || (p_code >= 0 && pv.code != p_code))
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
    PyObject *y = fresh_like(x, &yp);
    if (!y)
        return NULL;
    /* (the GIL held: fewer than TGN_SPLIT_NUMEL elements on one thread) */
    const int64_t bad = tgn_layer_rows(xv->data, yp, xv->numel / hidden, hidden, c->chunk, c->adds, c->n_adds,
                                       c->root, c->exact, pp[0], pp[1],
                                       eps == Py_None ? F.layer_eps : PyFloat_AS_DOUBLE(eps), NULL, NULL, xv->code,
                                       w_code, c->grain, 1);
    if (bad) { /* a NaN row (or an exact row left to torch ops), or no scratch: the Python path */
        Py_DECREF(y);
        return NULL;
    }
    return y;
}

/* The pipeline cached for (hidden, *options[0, n), no residual) in by_config (a new
 * reference), or NULL: none, or an option that cannot be a key (the error cleared). */
static PyObject *cached_pipeline(PyObject *by_config, int64_t hidden, PyObject *const *options, int n)
{
    PyObject *h = PyLong_FromLongLong(hidden), *key = h ? PyTuple_New(n + 2) : NULL;
    if (!key) {
        Py_XDECREF(h);
        PyErr_Clear();
        return NULL;
    }
    PyTuple_SET_ITEM(key, 0, h);
    for (int k = 0; k < n; ++k) {
        Py_INCREF(options[k]);
        PyTuple_SET_ITEM(key, k + 1, options[k]);
    }
    Py_INCREF(Py_False);
    PyTuple_SET_ITEM(key, n + 1, Py_False);
    PyObject *pipe = PyDict_GetItemWithError(by_config, key); /* borrowed */
    Py_XINCREF(pipe);
    Py_DECREF(key);
    if (!pipe)
        PyErr_Clear();
    return pipe;
}

/* What both faces check before their plan: the C side set up, by_config a dict, x (and
 * the weight and bias, each None or a tensor) plain tensors, eps None or a float, the
 * chunk size (options[0]) an int, ops.route's DIRECT, x a CPU contiguous tensor of a
 * kernel's dtype with 1 to TGN_SPLIT_NUMEL - 1 elements (its view in xv); then the
 * pipeline cached for (x's last dim, *options[0, n)) and its `face` attribute, both new
 * references held across the call (they hold the plan the face's bytes point into).
 * Returns 0, holding nothing, where any of it is not so (the error, if any, cleared). */
static int face_of(PyObject *by_config, PyObject *x, PyObject *w, PyObject *b, PyObject *eps,
                   PyObject *const *options, int n, view_t *xv, PyObject **pipe, PyObject **face)
{
    *pipe = *face = NULL;
    if (!F.ready || !PyDict_CheckExact(by_config) || !plain(x) || (w != Py_None && !plain(w)) ||
        (b != Py_None && !plain(b)) || (eps != Py_None && !PyFloat_CheckExact(eps)) ||
        !PyLong_CheckExact(options[0]) || !direct(x, w, b))
        return 0;
    if (!view(x, xv) || xv->ndim < 1 || xv->numel == 0 || xv->numel >= TGN_SPLIT_NUMEL)
        return 0;
    *pipe = cached_pipeline(by_config, xv->dims[xv->ndim - 1], options, n);
    *face = *pipe ? PyObject_GetAttr(*pipe, F.face) : NULL;
    if (!*face) {
        PyErr_Clear();
        Py_CLEAR(*pipe);
        return 0;
    }
    return 1;
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
    view_t xv;
    if (!face_of(args[0], x, w, b, eps, args + 5, 5, &xv, &pipe, &cfg))
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
 * known: y, or NULL (nothing done). */
static PyObject *run_rms(PyObject *faces, const view_t *xv, PyObject *x, PyObject *w, PyObject *eps)
{
    const int64_t hidden = xv->dims[xv->ndim - 1];
    view_t wv;
    wv.data = NULL;
    wv.code = -1;
    if (w != Py_None && (!view(w, &wv) || wv.ndim != 1 || wv.dims[0] != hidden))
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
        PyObject *d = PyDict_GetItemWithError(F.default_eps, F.dtypes[xv->code]); /* borrowed */
        if (!d || !PyFloat_CheckExact(d))
            return NULL;
        e = PyFloat_AS_DOUBLE(d);
    } else {
        e = PyFloat_AS_DOUBLE(eps);
    }
    void *yp;
    PyObject *y = fresh_like(x, &yp);
    if (!y)
        return NULL;
    /* (the GIL held: fewer than TGN_SPLIT_NUMEL elements on one thread) */
    if (tgn_rows_call(&c, xv->data, yp, xv->numel / hidden, wv.data, e, NULL, NULL, NULL, 1)) {
        Py_DECREF(y); /* a NaN total or result (or an exact row with no scale): the Python path */
        return NULL;
    }
    return y;
}

/* rms_face(by_config, x, weight, eps, chunk_size, topology, leaf, accumulate, executor,
 * casting_mode, offset): RMSNorm's y, or None (nothing done).  by_config:
 * pipeline/cache.py's cache of pipelines, whose `face` attribute is the direct call's
 * dict of configurations once the plan has run natively (None before). */
PyObject *tgn_py_rms_face(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "rms_face() takes 11 arguments");
        return NULL;
    }
    PyObject *x = args[1], *w = args[2], *eps = args[3], *pipe, *faces;
    view_t xv;
    if (!face_of(args[0], x, w, Py_None, eps, args + 4, 7, &xv, &pipe, &faces))
        Py_RETURN_NONE;
    PyObject *y = PyDict_CheckExact(faces) ? run_rms(faces, &xv, x, w, eps) : NULL;
    PyErr_Clear();
    Py_DECREF(faces); /* (held across the call: they hold the plan c.adds points into) */
    Py_DECREF(pipe);
    if (!y)
        Py_RETURN_NONE;
    return y;
}
