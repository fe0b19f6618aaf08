/* The one binding between Python and the native kernels: the extension module
 * (`_native_portable`, `_native_host`) that backends/native/loader.py imports.  Each
 * function the Python side calls is a METH_FASTCALL wrapper of the tgn_native.h entry
 * point of the same name with `tgn_` dropped, taking the same arguments in the same
 * order (each signature below carries the header's parameter names, which
 * tests/test_constants.py compares with it): tensors as addresses (ints, or None for
 * NULL), sizes and flags as ints, eps and offsets as floats.  The kernel runs with the
 * GIL released.  A vectorcall costs about 0.1 us here, where ctypes spent about 0.1 us
 * converting each argument.
 *
 * The direct path's configuration is a tgn_rows_cfg_t that `rows_config` packs into a
 * bytes object (this file is the only place its layout is written) and `rows_call`
 * copies out of it on each call; the `adds` address it holds must outlive it (direct.py
 * keeps the tensor).
 */
#ifndef TGN_MODULE
#error "setup.py defines TGN_MODULE, the module's name (_native_portable or _native_host)"
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "tgn_native.h"

/* One converted argument: `p` an address (None: NULL), `i` an int64, `d` a double. */
typedef union {
    void *p;
    int64_t i;
    double d;
} arg_t;

/* Converts args by spec (one letter per argument: p, i or d, as in arg_t) into out;
 * 0 with a Python error set on a wrong count or an argument of the wrong type. */
static int parse(const char *name, const char *spec, PyObject *const *args, Py_ssize_t nargs, arg_t *out)
{
    Py_ssize_t want = (Py_ssize_t)strlen(spec);
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return 0;
    }
    for (Py_ssize_t k = 0; k < want; k++) {
        PyObject *o = args[k];
        int failed;
        switch (spec[k]) {
        case 'p':
            out[k].p = o == Py_None ? NULL : PyLong_AsVoidPtr(o);
            failed = !out[k].p && o != Py_None && PyErr_Occurred();
            break;
        case 'i':
            out[k].i = PyLong_AsLongLong(o);
            failed = out[k].i == -1 && PyErr_Occurred();
            break;
        default: /* 'd' */
            out[k].d = PyFloat_AsDouble(o);
            failed = out[k].d == -1.0 && PyErr_Occurred();
        }
        if (failed)
            return 0;
    }
    return 1;
}

/* A wrapper: `name`'s arguments converted by `spec`, then `call` (an int64_t
 * expression over a[]) made with the GIL released; returns its value. */
#define TGN_WRAP(name, spec, call)                                                                     \
    static PyObject *py_##name(PyObject *self, PyObject *const *args, Py_ssize_t nargs)               \
    {                                                                                                  \
        arg_t a[sizeof(spec) - 1];                                                                     \
        int64_t result;                                                                                \
        (void)self;                                                                                    \
        if (!parse(#name, spec, args, nargs, a))                                                       \
            return NULL;                                                                               \
        Py_BEGIN_ALLOW_THREADS                                                                         \
        result = (call);                                                                               \
        Py_END_ALLOW_THREADS                                                                           \
        return PyLong_FromLongLong(result);                                                            \
    }

/* The forward's rows: x, rows, hidden, row_stride, pair / (chunk, adds, n_adds, root,
 * total); then FINALIZE's y, y_stride, w, eps, flags, offset; then the residual's r,
 * r_stride, h, h_stride. */
#define FINALIZE_ARGS(k) a[k].p, a[k + 1].i, a[k + 2].p, a[k + 3].d, a[k + 4].i, a[k + 5].d, \
                         a[k + 6].p, a[k + 7].i, a[k + 8].p, a[k + 9].i
#define EXACT_ROWS(name) \
    TGN_WRAP(name, "piiip" "pipdid" "pipi", tgn_##name(a[0].p, a[1].i, a[2].i, a[3].i, a[4].p, FINALIZE_ARGS(5)))
/* (flags without TGN_TREE_ADDS: only C sets it, having checked the plan's merges) */
#define FLOAT_ROWS(name)                                                                                    \
    TGN_WRAP(name, "piiiipiip" "pipdid" "pipi",                                                             \
             (a[13].i &= ~(int64_t)TGN_TREE_ADDS,                                                           \
              tgn_##name(a[0].p, a[1].i, a[2].i, a[3].i, a[4].i, a[5].p, a[6].i, a[7].i, a[8].p, FINALIZE_ARGS(9))))
EXACT_ROWS(exact_rows_f32)
EXACT_ROWS(exact_rows_f64)
FLOAT_ROWS(float_rows_f32)
FLOAT_ROWS(float_rows_f64)

TGN_WRAP(backward_rows_f32_team, "ppppiiipiiippii",
         tgn_backward_rows_f32_team(a[0].p, a[1].p, a[2].p, a[3].p, a[4].i, a[5].i, a[6].i, a[7].p, a[8].i,
                                    a[9].i, a[10].i, a[11].p, a[12].p, a[13].i, a[14].i))
TGN_WRAP(backward_exact_dw_f32_team, "ppppiiipiiippiiip",
         tgn_backward_exact_dw_f32_team(a[0].p, a[1].p, a[2].p, a[3].p, a[4].i, a[5].i, a[6].i, a[7].p, a[8].i,
                                        a[9].i, a[10].i, a[11].p, a[12].p, a[13].i, a[14].i, a[15].i, a[16].p))
TGN_WRAP(rms_of_totals_f32, "piiidp", (tgn_rms_of_totals_f32(a[0].p, a[1].i, a[2].i, a[3].i, a[4].d, a[5].p), 0))
TGN_WRAP(exact_dw_f32_team, "pipipiipiii",
         tgn_exact_dw_f32_team(a[0].p, a[1].i, a[2].p, a[3].i, a[4].p, a[5].i, a[6].i, a[7].p, a[8].i, a[9].i,
                               a[10].i))
TGN_WRAP(exact_round_f32, "piiip", (tgn_exact_round_f32(a[0].p, a[1].i, a[2].i, a[3].i, a[4].p), 0))
TGN_WRAP(team_use_openmp, "pp", tgn_team_use_openmp(a[0].p, a[1].p))
TGN_WRAP(layer_rows, "ppiiipiiippdppiiii",
         tgn_layer_rows(a[0].p, a[1].p, a[2].i, a[3].i, a[4].i, a[5].p, a[6].i, a[7].i, a[8].i, a[9].p, a[10].p,
                        a[11].d, a[12].p, a[13].p, a[14].i, a[15].i, a[16].i, a[17].i))
TGN_WRAP(layer_backward, "ppppppiiipiiiiiiipii",
         tgn_layer_backward(a[0].p, a[1].p, a[2].p, a[3].p, a[4].p, a[5].p, a[6].i, a[7].i, a[8].i, a[9].p, a[10].i,
                            a[11].i, a[12].i, a[13].i, a[14].i, a[15].i, a[16].i, a[17].p, a[18].i, a[19].i))

TGN_WRAP(gate_silu, "piipp", tgn_gate_silu(a[0].p, a[1].i, a[2].i, a[3].p, a[4].p))
TGN_WRAP(gate_product, "pipiipi", tgn_gate_product(a[0].p, a[1].i, a[2].p, a[3].i, a[4].i, a[5].p, a[6].i))
TGN_WRAP(adds_tree, "piii", tgn_adds_tree(a[0].p, a[1].i, a[2].i, a[3].i))
TGN_WRAP(advise_huge, "pi", (tgn_advise_huge(a[0].p, a[1].i), 0))

static PyObject *py_exact_scale(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    arg_t a[2];
    double sigma1, sigma2;
    (void)self;
    if (!parse("exact_scale", "di", args, nargs, a))
        return NULL;
    tgn_exact_scale(a[0].d, a[1].i, &sigma1, &sigma2);
    return Py_BuildValue("(dd)", sigma1, sigma2);
}

static PyObject *py_team_worker_rows(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    return PyLong_FromLongLong(tgn_team_worker_rows());
}

static PyObject *py_team_openmp(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    return PyLong_FromLong(tgn_team_openmp());
}

static PyObject *py_native_abi(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    return PyLong_FromLong(tgn_native_abi());
}

/* {name: value} of tgn_constants, the values this build was made from. */
static PyObject *py_constants(PyObject *self, PyObject *unused)
{
    (void)self, (void)unused;
    PyObject *table = PyDict_New();
    for (const tgn_constant_t *c = tgn_constants; table && c->name; c++) {
        PyObject *value = PyLong_FromLongLong(c->value);
        if (!value || PyDict_SetItemString(table, c->name, value) < 0)
            Py_CLEAR(table);
        Py_XDECREF(value);
    }
    return table;
}

/* A tgn_rows_cfg_t packed into bytes (keywords; those left out are 0, grain 1). */
static PyObject *py_rows_config(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"exact", "hidden", "chunk", "adds", "n_adds", "root", "flags", "total_flags",
                               "offset", "grain", "x_dtype", "y_dtype", "w_dtype", "w_round", NULL};
    tgn_rows_cfg_t cfg;
    PyObject *adds = Py_None;
    (void)self;
    memset(&cfg, 0, sizeof cfg);
    cfg.grain = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$LLLOLLLLdLLLLL:rows_config", keywords, &cfg.exact,
                                     &cfg.hidden, &cfg.chunk, &adds, &cfg.n_adds, &cfg.root, &cfg.flags,
                                     &cfg.total_flags, &cfg.offset, &cfg.grain, &cfg.x_dtype, &cfg.y_dtype,
                                     &cfg.w_dtype, &cfg.w_round))
        return NULL;
    cfg.adds = adds == Py_None ? NULL : PyLong_AsVoidPtr(adds);
    if (!cfg.adds && adds != Py_None)
        return NULL;
    if (cfg.hidden < 1 || cfg.grain < 1) {
        PyErr_SetString(PyExc_ValueError, "rows_config(): hidden and grain must be at least 1");
        return NULL;
    }
    int64_t codes[] = {cfg.x_dtype, cfg.y_dtype, cfg.w_dtype, cfg.w_round};
    for (int k = 0; k < 4; k++)
        if (codes[k] != TGN_DTYPE_F32 && codes[k] != TGN_DTYPE_BF16 && codes[k] != TGN_DTYPE_F16) {
            PyErr_SetString(PyExc_ValueError, "rows_config(): a dtype code is not one of TGN_DTYPE_*");
            return NULL;
        }
    if (cfg.y_dtype != TGN_DTYPE_F32 && cfg.y_dtype != cfg.x_dtype) {
        PyErr_SetString(PyExc_ValueError, "rows_config(): a narrow y must have x's dtype");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)&cfg, sizeof cfg);
}

/* The direct path's hot call, unrolled (no spec walk): rows_call(c, x, y, rows, w,
 * eps, total, r, h, threads, mapped), c the bytes of rows_config(). */
static void *address(PyObject *o) { return o == Py_None ? NULL : PyLong_AsVoidPtr(o); }

/* c, the bytes of rows_config(), copied into cfg; 0 with a TypeError set if it is not them. */
static int unpack_config(const char *name, PyObject *c, tgn_rows_cfg_t *cfg)
{
    if (!PyBytes_Check(c) || PyBytes_GET_SIZE(c) != (Py_ssize_t)sizeof *cfg) {
        PyErr_Format(PyExc_TypeError, "%s(): c must be the bytes rows_config() returns", name);
        return 0;
    }
    memcpy(cfg, PyBytes_AS_STRING(c), sizeof *cfg); /* bytes data need not be 8-aligned */
    return 1;
}

static PyObject *py_rows_call(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    tgn_rows_cfg_t cfg;
    (void)self;
    if (nargs != 11) {
        PyErr_Format(PyExc_TypeError, "rows_call() takes 11 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!unpack_config("rows_call", args[0], &cfg))
        return NULL;
    const void *x = address(args[1]);
    void *y = address(args[2]);
    int64_t n = PyLong_AsLongLong(args[3]);
    const void *w = address(args[4]);
    double eps = PyFloat_AsDouble(args[5]);
    void *total = address(args[6]);
    const void *r = address(args[7]);
    void *h = address(args[8]);
    int64_t threads = PyLong_AsLongLong(args[9]);
    int64_t mapped = PyObject_IsTrue(args[10]);
    if (mapped < 0 || PyErr_Occurred())
        return NULL;
    if (n < 0 || (!x && n > 0)) {
        PyErr_SetString(PyExc_ValueError, "rows_call(): x must be an address and rows >= 0");
        return NULL;
    }
    if (n == 0)
        return PyLong_FromLong(0); /* an empty input: nothing to read or write */
    int64_t result;
    Py_BEGIN_ALLOW_THREADS
    result = tgn_rows_call(&cfg, x, y, n, w, eps, total, r, h, threads, mapped);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(result);
}

/* gated_rows(c, x, g, g_dtype, y, rows, w, eps, groups, after, threads): tgn_gated_rows, c
 * the bytes of rows_config() (the plan of one group). */
static PyObject *py_gated_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    tgn_rows_cfg_t cfg;
    arg_t a[10];
    int64_t result;
    (void)self;
    if (nargs != 11) {
        PyErr_Format(PyExc_TypeError, "gated_rows() takes 11 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!unpack_config("gated_rows", args[0], &cfg) || !parse("gated_rows", "ppipipdiii", args + 1, 10, a))
        return NULL;
    if (a[4].i < 0 || (a[4].i > 0 && (!a[0].p || !a[1].p || !a[3].p))) {
        PyErr_SetString(PyExc_ValueError, "gated_rows(): x, g and y must be addresses and rows >= 0");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    result = tgn_gated_rows(&cfg, a[0].p, a[1].p, a[2].i, a[3].p, a[4].i, a[5].p, a[6].d, a[7].i, a[8].i, a[9].i);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(result);
}

/* native_face.c: the functional faces' warm call. */
PyObject *tgn_py_face_setup(PyObject *self, PyObject *args);
PyObject *tgn_py_layer_face_config(PyObject *self, PyObject *args);
PyObject *tgn_py_layer_face(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *tgn_py_rms_face(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

#define FASTCALL(name, params, doc) \
    {#name, (PyCFunction)(void (*)(void))py_##name, METH_FASTCALL, #name "($module, " params ", /)\n--\n\n" doc}
#define NOARGS(name, doc) {#name, py_##name, METH_NOARGS, #name "($module, /)\n--\n\n" doc}
#define FORWARD_PARAMS "y, y_stride, w, eps, flags, offset, r, r_stride, h, h_stride"

static PyMethodDef methods[] = {
    FASTCALL(rows_call, "c, x, y, rows, w, eps, total, r, h, threads, mapped",
             "The direct path's rows on the team (c: rows_config()'s bytes); rows left to the general path."),
    {"rows_config", (PyCFunction)(void (*)(void))py_rows_config, METH_VARARGS | METH_KEYWORDS,
     "rows_config($module, /, *, exact=0, hidden=0, chunk=0, adds=None, n_adds=0, root=0, flags=0, "
     "total_flags=0, offset=0.0, grain=1, x_dtype=0, y_dtype=0, w_dtype=0, w_round=0)\n--\n\n"
     "A tgn_rows_cfg_t, packed, for rows_call."},
    FASTCALL(exact_rows_f32, "x, rows, hidden, row_stride, pair, " FORWARD_PARAMS, "tgn_exact_rows_f32."),
    FASTCALL(exact_rows_f64, "x, rows, hidden, row_stride, pair, " FORWARD_PARAMS, "tgn_exact_rows_f64."),
    FASTCALL(float_rows_f32, "x, rows, hidden, row_stride, chunk, adds, n_adds, root, total, " FORWARD_PARAMS,
             "tgn_float_rows_f32."),
    FASTCALL(float_rows_f64, "x, rows, hidden, row_stride, chunk, adds, n_adds, root, total, " FORWARD_PARAMS,
             "tgn_float_rows_f64."),
    FASTCALL(gated_rows, "c, x, g, g_dtype, y, rows, w, eps, groups, after, threads",
             "tgn_gated_rows (native_gated.c): a gated RMSNorm's rows in one pass; rows left to the caller."),
    FASTCALL(gate_silu, "g, g_dtype, n, silu, sigmoid", "tgn_gate_silu."),
    FASTCALL(gate_product, "g, g_dtype, v, v_dtype, n, out, out_dtype", "tgn_gate_product."),
    FASTCALL(advise_huge, "p, bytes", "tgn_advise_huge: the pages of a fresh output advised as huge-page candidates."),
    FASTCALL(adds_tree, "adds, n_adds, n_chunks, root",
             "tgn_adds_tree: 1 when the merges are the tree topology's pairwise levels."),
    FASTCALL(exact_scale, "row_max, hidden", "(sigma1, sigma2) of tgn_exact_scale (0.0, 0.0: no scale)."),
    FASTCALL(backward_rows_f32_team,
             "x, dy, w, rms, rows, hidden, chunk, adds, n_adds, root, exact, dx, dw, grain, threads",
             "tgn_backward_rows_f32_team."),
    FASTCALL(backward_exact_dw_f32_team,
             "x, dy, w, rms, rows, hidden, chunk, adds, n_adds, root, exact, dx, state, grain, threads, fresh, dw",
             "tgn_backward_exact_dw_f32_team."),
    FASTCALL(rms_of_totals_f32, "total, rows, channels, hidden, eps, rms", "tgn_rms_of_totals_f32; returns 0."),
    FASTCALL(exact_dw_f32_team, "dy, dy_stride, xh, xh_stride, rms, rows, cols, state, stride, grain, threads",
             "tgn_exact_dw_f32_team."),
    FASTCALL(exact_round_f32, "state, n, stride, to_odd, out", "tgn_exact_round_f32; returns 0."),
    FASTCALL(team_use_openmp, "parallel, thread_num", "tgn_team_use_openmp."),
    FASTCALL(layer_rows,
             "x, y, rows, hidden, chunk, adds, n_adds, root, exact, w, b, eps, mean, den, x_dtype, w_dtype, grain, "
             "threads",
             "tgn_layer_rows (native_layer.c): LayerNorm's rows; returns the rows left to torch ops."),
    FASTCALL(layer_backward,
             "x, dy, dx, w, mean, den, rows, hidden, chunk, adds, n_adds, root, exact, x_dtype, w_dtype, want_w, "
             "want_b, dwb, grain, threads",
             "tgn_layer_backward (native_layer_backward.c): LayerNorm's dx, dW and db."),
    {"face_setup", tgn_py_face_setup, METH_VARARGS,
     "face_setup($module, tensor, parameter, empty_like, to_dlpack, dispatch_len, tracing_state, functorch_active, "
     "grad_enabled, forward_ad, allowed, triton_asked, default_eps, float32, bfloat16, float16, threads, layer_eps, "
     "/)\n--\n\nnative_face.c's Python objects, once."},
    {"layer_face_config", tgn_py_layer_face_config, METH_VARARGS,
     "layer_face_config($module, hidden, chunk, adds, n_adds, root, exact, grain, /)\n--\n\n"
     "A LayerNorm plan's packed arguments for layer_face."},
    {"layer_face", (PyCFunction)(void (*)(void))tgn_py_layer_face, METH_FASTCALL,
     "layer_face($module, by_config, x, weight, bias, eps, chunk_size, topology, leaf, accumulate, executor, /)\n--\n\n"
     "LayerNorm's warm call checked and run in C (native_face_calls.c): y, or None."},
    {"rms_face", (PyCFunction)(void (*)(void))tgn_py_rms_face, METH_FASTCALL,
     "rms_face($module, by_config, x, weight, eps, chunk_size, topology, leaf, accumulate, executor, casting_mode, "
     "offset, out, large, /)\n--\n\nRMSNorm's warm call checked and run in C (native_face_calls.c): y (out), or None."},
    NOARGS(team_openmp, "tgn_team_openmp."),
    NOARGS(team_worker_rows, "tgn_team_worker_rows."),
    NOARGS(native_abi, "tgn_native_abi: NATIVE_ABI as this build was made."),
    NOARGS(constants, "{name: value} of tgn_constants, the values this build was made from."),
    {NULL, NULL, 0, NULL},
};

#define TGN_CAT2(a, b) a##b
#define TGN_CAT(a, b) TGN_CAT2(a, b)
#define TGN_STR2(a) #a
#define TGN_STR(a) TGN_STR2(a)

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, TGN_STR(TGN_MODULE),
                                    "taskgraph_norm's native kernels (backends/native/csrc/native_module.c).",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC TGN_CAT(PyInit_, TGN_MODULE)(void) { return PyModule_Create(&module); }
