/* The functional faces' warm call in C (backends/native/face.py): a call that ops.route
 * sends straight to the kernel, checked and run in one C call, for LayerNorm
 * (layer_face) and RMSNorm (rms_face).  This file makes the checks both faces share and
 * their output; native_face_calls.c, the two calls.
 *
 * On a (1, 4096) row the kernel takes about 1 us, and the Python checks before it
 * (route, the tensors' dtype, device, layout, shape and address, one attribute each)
 * took longer than the kernel.  Here a tensor's metadata comes from one call,
 * torch._C._to_dlpack (the DLPack capsule's DLTensor: address, device, dtype, shape,
 * strides), ops.route's checks are the same calls ops/routing.py makes, and the kernel
 * is the same entry with the same arguments as the Python warm path's
 * (backends/native/layer_direct.py's tgn_layer_rows, direct.py's tgn_rows_call), so the
 * same bits.  Below TGN_SPLIT_NUMEL elements the kernel runs with the GIL held (a few
 * us); RMSNorm's face takes larger calls where its caller allows, with the GIL released
 * and the rows shared among team.threads() threads, and writes a given `out`.
 *
 * Anything else returns None having done nothing, and the face runs its Python path
 * (with its errors): a tensor subclass, a tracer, a dispatch mode, a torch.func
 * transform, forward AD, a gradient to record, another device or dtype, strides, an
 * `out` the direct path would not write (LayerNorm's: any), a context that does not
 * allow native C or names Triton, a large call its caller keeps (LayerNorm's: all), a
 * configuration not yet run natively, a row the kernel leaves to torch ops.  The DLPack
 * structs are the legacy ABI (dlpack.h v0.x), the one torch._C._to_dlpack's "dltensor"
 * capsule has held since DLPack's first version. */
#include "native_face.h"
#include "tgn_native.h"

#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

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

enum { DL_CPU = 1, DL_FLOAT = 2, DL_BFLOAT = 4 };

tgn_face_state_t tgn_face;

PyObject *tgn_py_face_setup(PyObject *self, PyObject *args)
{
    (void)self;
    enum { N = 16 };
    PyObject *o[N];
    double eps;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOOOOd:face_setup", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                          &o[7], &o[8], &o[9], &o[10], &o[11], &o[12], &o[13], &o[14], &o[15], &eps))
        return NULL;
    if (!PyContextVar_CheckExact(o[9]) || !PyContextVar_CheckExact(o[10]) || !PyDict_CheckExact(o[11])) {
        PyErr_SetString(PyExc_TypeError,
                        "face_setup(): the backends' context variables must be ContextVars, default_eps a dict");
        return NULL;
    }
    PyObject **slots[N] = {&tgn_face.tensor,           &tgn_face.parameter,
                           &tgn_face.empty_like,       &tgn_face.to_dlpack,
                           &tgn_face.dispatch_len,     &tgn_face.tracing_state,
                           &tgn_face.functorch_active, &tgn_face.grad_enabled,
                           &tgn_face.forward_ad,       &tgn_face.allowed,
                           &tgn_face.triton_asked,     &tgn_face.default_eps,
                           &tgn_face.dtypes[TGN_DTYPE_F32], &tgn_face.dtypes[TGN_DTYPE_BF16],
                           &tgn_face.dtypes[TGN_DTYPE_F16], &tgn_face.threads};
    const char *names[] = {"native", "requires_grad", "_current_level", "data_ptr", "face"};
    PyObject **interned[] = {&tgn_face.native, &tgn_face.requires_grad, &tgn_face.level, &tgn_face.data_ptr,
                             &tgn_face.face};
    for (int k = 0; k < 5; ++k)
        if (!*interned[k] && !(*interned[k] = PyUnicode_InternFromString(names[k])))
            return NULL;
    for (int k = 0; k < N; ++k) {
        Py_INCREF(o[k]);
        Py_XSETREF(*slots[k], o[k]);
    }
    tgn_face.layer_eps = eps;
    tgn_face.ready = 1;
    Py_RETURN_NONE;
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
    return (PyObject *)Py_TYPE(t) == tgn_face.tensor || (PyObject *)Py_TYPE(t) == tgn_face.parameter;
}

/* ops.route(x, w, b) == DIRECT (a tracer, a dispatch mode, a torch.func transform,
 * forward AD or a gradient to record: not), and the backends' context lets native C
 * run (not triton_asked(), "native" in allowed()).  The caller checked the types and
 * that nothing compiles. */
static int direct(PyObject *x, PyObject *w, PyObject *b)
{
    PyObject *n = PyObject_CallNoArgs(tgn_face.dispatch_len);
    const long modes = n ? PyLong_AsLong(n) : -1;
    Py_XDECREF(n);
    PyObject *tracing = PyObject_CallNoArgs(tgn_face.tracing_state);
    const int traced = tracing != Py_None;
    Py_XDECREF(tracing);
    PyObject *level = PyObject_GetAttr(tgn_face.forward_ad, tgn_face.level);
    const long lv = level ? PyLong_AsLong(level) : 0;
    Py_XDECREF(level);
    if (PyErr_Occurred() || modes != 0 || traced || lv >= 0 ||
        truth(PyObject_CallNoArgs(tgn_face.functorch_active)) != 0) {
        PyErr_Clear();
        return 0;
    }
    const int grad = truth(PyObject_CallNoArgs(tgn_face.grad_enabled));
    if (grad < 0)
        return 0;
    PyObject *ts[3] = {x, w, b};
    for (int k = 0; grad && k < 3; ++k)
        if (ts[k] != Py_None && truth(PyObject_GetAttr(ts[k], tgn_face.requires_grad)) != 0)
            return 0;
    PyObject *v = NULL;
    if (PyContextVar_Get(tgn_face.triton_asked, NULL, &v) < 0 || v != Py_False) {
        Py_XDECREF(v);
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(v);
    if (PyContextVar_Get(tgn_face.allowed, NULL, &v) < 0 || !v) {
        PyErr_Clear();
        return 0;
    }
    const int in = PySequence_Contains(v, tgn_face.native);
    Py_DECREF(v);
    if (in < 0)
        PyErr_Clear();
    return in == 1;
}

int tgn_face_view(PyObject *t, tgn_view_t *v)
{
    PyObject *cap = PyObject_CallOneArg(tgn_face.to_dlpack, t);
    dl_managed_t *m = cap ? (dl_managed_t *)PyCapsule_GetPointer(cap, "dltensor") : NULL;
    int ok = 0;
    if (m && m->t.device_type == DL_CPU && m->t.lanes == 1 && m->t.ndim >= 0 && m->t.ndim <= TGN_FACE_MAX_DIMS) {
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

PyObject *tgn_face_fresh(PyObject *x, void **at)
{
    PyObject *y = PyObject_CallOneArg(tgn_face.empty_like, x);
    PyObject *p = y ? PyObject_CallMethodNoArgs(y, tgn_face.data_ptr) : NULL;
    *at = p ? PyLong_AsVoidPtr(p) : NULL;
    Py_XDECREF(p);
    if (!*at) {
        PyErr_Clear();
        Py_CLEAR(y);
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
 * kernel's dtype with 1 to limit - 1 elements (its view in xv); then the pipeline cached
 * for (x's last dim, *options[0, n)) and its `face` attribute, both new references held
 * across the call (they hold the plan the face's bytes point into).  Returns 0, holding
 * nothing, where any of it is not so (the error, if any, cleared). */
int tgn_face_of(PyObject *by_config, PyObject *x, PyObject *w, PyObject *b, PyObject *eps, PyObject *const *options,
                int n, int64_t limit, tgn_view_t *xv, PyObject **pipe, PyObject **face)
{
    *pipe = *face = NULL;
    if (!tgn_face.ready || !PyDict_CheckExact(by_config) || !plain(x) || (w != Py_None && !plain(w)) ||
        (b != Py_None && !plain(b)) || (eps != Py_None && !PyFloat_CheckExact(eps)) ||
        !PyLong_CheckExact(options[0]) || !direct(x, w, b))
        return 0;
    if (!tgn_face_view(x, xv) || xv->ndim < 1 || xv->numel == 0 || xv->numel >= limit)
        return 0;
    *pipe = cached_pipeline(by_config, xv->dims[xv->ndim - 1], options, n);
    *face = *pipe ? PyObject_GetAttr(*pipe, tgn_face.face) : NULL;
    if (!*face) {
        PyErr_Clear();
        Py_CLEAR(*pipe);
        return 0;
    }
    return 1;
}

void tgn_advise_huge(void *p, int64_t bytes)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), at = (uintptr_t)p, start = (at + page - 1) / page * page;
    if (bytes > 0 && (uintptr_t)bytes > start - at)
        (void)madvise((void *)start, ((uintptr_t)bytes - (start - at)) / page * page, MADV_HUGEPAGE); /* advice only */
#else
    (void)p, (void)bytes;
#endif
}

/* Whether the byte ranges [a, a + na) and [b, b + nb) meet. */
static int overlap(const char *a, int64_t na, const char *b, int64_t nb) { return a < b + nb && b < a + na; }

/* The output of a call on x (xv) of `bytes` bytes, its address in *at: `out` itself
 * when it can take the rows (a plain CPU contiguous tensor of x's dtype and shape whose
 * bytes meet neither x's nor the weight's, wv: direct.py's checks; else the Python path
 * checks it and raises, or runs an in-place call), or a fresh tensor like x, advised as
 * a huge-page candidate from TGN_HUGE_BYTES on (*mapped: 1, tgn_rows_call's `mapped`);
 * NULL where neither (error cleared). */
PyObject *tgn_face_output(PyObject *out, PyObject *x, const tgn_view_t *xv, int64_t bytes, const tgn_view_t *wv,
                          int64_t w_bytes, void **at, int64_t *mapped)
{
    *mapped = 0;
    if (out == Py_None) {
        PyObject *y = tgn_face_fresh(x, at);
        if (y && bytes >= TGN_HUGE_BYTES) {
            tgn_advise_huge(*at, bytes);
            *mapped = 1;
        }
        return y;
    }
    tgn_view_t ov;
    if (!plain(out) || !tgn_face_view(out, &ov) || ov.code != xv->code || ov.ndim != xv->ndim ||
        memcmp(ov.dims, xv->dims, (size_t)xv->ndim * sizeof ov.dims[0]) || overlap(ov.data, bytes, xv->data, bytes) ||
        (wv->data && overlap(ov.data, bytes, wv->data, w_bytes)))
        return NULL;
    *at = ov.data;
    Py_INCREF(out);
    return out;
}

