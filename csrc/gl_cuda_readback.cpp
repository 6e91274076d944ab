// GL -> CUDA frame readback for vlmrm_fast.render.BatchRenderer (the GPU path).
//
// MuJoCo draws a frame with mjr_render into its offscreen framebuffer `offFBO` (multisampled when
// offSamples > 0). For each env, PboReader::read() resolves it into `offFBO_r` with a blit (what
// mjr_readPixels does first) and issues glReadPixels(GL_RGB, GL_UNSIGNED_BYTE) into a pixel-pack
// buffer (PBO), frame `slot` at byte offset slot * H * W * 3 (GL_PACK_ALIGNMENT = 1, so rows are
// tightly packed for any width). glReadPixels into a PBO is asynchronous. PboReader::copy_to() then
// maps the PBO, registered once with CUDA, on the current torch stream and copies all frames into a
// uint8 CUDA tensor [N, H, W, 3] with one device-to-device copy. Rows stay in OpenGL order
// (bottom-up); the reward model's preprocessing kernel flips them (CLIPReward(..., bottom_up=True)).
//
// The GL context (MuJoCo's EGL context) is owned by Python and must be current on the calling thread
// for every method. GL entry points are resolved at run time with eglGetProcAddress from libEGL.so.1
// (dlopen), so neither GL headers nor GL/EGL libraries are needed to build this file.
//
// Synchronisation: cudaGraphicsMapResources on a stream orders all GL work issued before it (the
// glReadPixels calls) before CUDA work in that stream; cudaGraphicsUnmapResources orders the copy
// before any later GL work that touches the buffer (the next batch's glReadPixels).

#include <torch/extension.h>
#include <torch/version.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdint>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

// What this file was built against, kept in the library as text: when it does not load (built against
// another torch, the usual cause), vlmrm_fast.render._cuda reads it from the file to name that torch.
#define VLMRM_STR_(x) #x
#define VLMRM_STR(x) VLMRM_STR_(x)
extern "C" __attribute__((used, visibility("default"))) const char vlmrm_fast_build_info[] =
    "vlmrm_fast extension built with: torch " VLMRM_STR(TORCH_VERSION_MAJOR) "." VLMRM_STR(TORCH_VERSION_MINOR) "."
    VLMRM_STR(TORCH_VERSION_PATCH) ", CUDA runtime " VLMRM_STR(CUDART_VERSION);

// ---------------------------------------------------------------------------------------------
// CUDA <-> OpenGL interop declarations. cuda_gl_interop.h needs <GL/gl.h>, which machines without
// GL development headers lack; the three functions used here have C linkage in libcudart and these
// exact signatures (CUDA runtime API reference, "OpenGL Interoperability"). Define
// VLMRM_NO_GL_HEADERS to use these declarations even where the headers exist.
#if defined(__has_include)
#if !defined(VLMRM_NO_GL_HEADERS) && __has_include(<GL/gl.h>) && __has_include(<cuda_gl_interop.h>)
#include <GL/gl.h>
#include <cuda_gl_interop.h>
#define VLMRM_HAVE_CUDA_GL_INTEROP_H 1
#endif
#endif

#ifndef VLMRM_HAVE_CUDA_GL_INTEROP_H
extern "C" {
enum cudaGLDeviceList {
  cudaGLDeviceListAll = 1,
  cudaGLDeviceListCurrentFrame = 2,
  cudaGLDeviceListNextFrame = 3
};
cudaError_t cudaGLGetDevices(unsigned int* pCudaDeviceCount, int* pCudaDevices,
                             unsigned int cudaDeviceCount, enum cudaGLDeviceList deviceList);
cudaError_t cudaGraphicsGLRegisterBuffer(struct cudaGraphicsResource** resource,
                                         unsigned int buffer, unsigned int flags);
}
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// OpenGL, loaded through EGL. Types and enum values as in Khronos' glcorearb.h.
using GLenum = unsigned int;
using GLuint = unsigned int;
using GLint = int;
using GLsizei = int;
using GLbitfield = unsigned int;
using GLsizeiptr = std::ptrdiff_t;
using GLintptr = std::ptrdiff_t;

constexpr GLenum kGL_NO_ERROR = 0;
constexpr GLbitfield kGL_COLOR_BUFFER_BIT = 0x00004000;
constexpr GLenum kGL_READ_BUFFER = 0x0C02;
constexpr GLenum kGL_PACK_ALIGNMENT = 0x0D05;
constexpr GLenum kGL_UNSIGNED_BYTE = 0x1401;
constexpr GLenum kGL_RGB = 0x1907;
constexpr GLenum kGL_NEAREST = 0x2600;
constexpr GLenum kGL_STREAM_COPY = 0x88E2;
constexpr GLenum kGL_PIXEL_PACK_BUFFER = 0x88EB;
constexpr GLenum kGL_PIXEL_PACK_BUFFER_BINDING = 0x88ED;
constexpr GLenum kGL_DRAW_FRAMEBUFFER_BINDING = 0x8CA6;
constexpr GLenum kGL_READ_FRAMEBUFFER = 0x8CA8;
constexpr GLenum kGL_DRAW_FRAMEBUFFER = 0x8CA9;
constexpr GLenum kGL_READ_FRAMEBUFFER_BINDING = 0x8CAA;
constexpr GLenum kGL_COLOR_ATTACHMENT0 = 0x8CE0;

struct GLFunctions {
  GLenum (*GetError)();
  void (*GetIntegerv)(GLenum, GLint*);
  void (*BindFramebuffer)(GLenum, GLuint);
  void (*BlitFramebuffer)(GLint, GLint, GLint, GLint, GLint, GLint, GLint, GLint, GLbitfield,
                          GLenum);
  void (*ReadBuffer)(GLenum);
  void (*ReadPixels)(GLint, GLint, GLsizei, GLsizei, GLenum, GLenum, void*);
  void (*PixelStorei)(GLenum, GLint);
  void (*GenBuffers)(GLsizei, GLuint*);
  void (*DeleteBuffers)(GLsizei, const GLuint*);
  void (*BindBuffer)(GLenum, GLuint);
  void (*BufferData)(GLenum, GLsizeiptr, const void*, GLenum);
  void (*GetBufferSubData)(GLenum, GLintptr, GLsizeiptr, void*);
};

using EglGetProcAddressFn = void* (*)(const char*);

// Core GL 1.x entry points are returned by eglGetProcAddress on EGL 1.5 / with
// EGL_KHR_get_all_proc_addresses (Mesa, NVIDIA); libOpenGL/libGL (GLVND dispatch) is the fallback.
void* gl_library() {
  static void* lib = [] {
    void* l = dlopen("libOpenGL.so.0", RTLD_NOW | RTLD_GLOBAL);
    if (l == nullptr) l = dlopen("libGL.so.1", RTLD_NOW | RTLD_GLOBAL);
    return l;
  }();
  return lib;
}

template <typename T>
void load_symbol(EglGetProcAddressFn get, const char* name, T* out) {
  void* p = get(name);
  if (p == nullptr && gl_library() != nullptr) p = dlsym(gl_library(), name);
  if (p == nullptr) {
    throw std::runtime_error(std::string("eglGetProcAddress could not resolve ") + name);
  }
  *out = reinterpret_cast<T>(p);
}

const GLFunctions& gl() {
  static GLFunctions fns;
  static std::once_flag once;
  static std::string error;
  std::call_once(once, [] {
    try {
      void* lib = dlopen("libEGL.so.1", RTLD_NOW | RTLD_GLOBAL);
      if (lib == nullptr) lib = dlopen("libEGL.so", RTLD_NOW | RTLD_GLOBAL);
      if (lib == nullptr) throw std::runtime_error("cannot dlopen libEGL.so.1 (no EGL library)");
      auto get = reinterpret_cast<EglGetProcAddressFn>(dlsym(lib, "eglGetProcAddress"));
      if (get == nullptr) throw std::runtime_error("libEGL has no eglGetProcAddress");
      load_symbol(get, "glGetError", &fns.GetError);
      load_symbol(get, "glGetIntegerv", &fns.GetIntegerv);
      load_symbol(get, "glBindFramebuffer", &fns.BindFramebuffer);
      load_symbol(get, "glBlitFramebuffer", &fns.BlitFramebuffer);
      load_symbol(get, "glReadBuffer", &fns.ReadBuffer);
      load_symbol(get, "glReadPixels", &fns.ReadPixels);
      load_symbol(get, "glPixelStorei", &fns.PixelStorei);
      load_symbol(get, "glGenBuffers", &fns.GenBuffers);
      load_symbol(get, "glDeleteBuffers", &fns.DeleteBuffers);
      load_symbol(get, "glBindBuffer", &fns.BindBuffer);
      load_symbol(get, "glBufferData", &fns.BufferData);
      load_symbol(get, "glGetBufferSubData", &fns.GetBufferSubData);
    } catch (const std::exception& e) {
      error = e.what();
    }
  });
  if (!error.empty()) throw std::runtime_error(error);
  return fns;
}

void check_gl(const char* what) {
  GLenum err = gl().GetError();
  if (err != kGL_NO_ERROR) {
    // Drain the remaining flags so that the next check reports only new errors.
    for (int i = 0; i < 16 && gl().GetError() != kGL_NO_ERROR; ++i) {
    }
    std::ostringstream msg;
    msg << "OpenGL error 0x" << std::hex << err << " in " << what
        << " (is the renderer's GL context current on this thread?)";
    throw std::runtime_error(msg.str());
  }
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::ostringstream msg;
    msg << what << " failed: " << cudaGetErrorName(err) << ": " << cudaGetErrorString(err);
    throw std::runtime_error(msg.str());
  }
}

// ---------------------------------------------------------------------------------------------
class PboReader {
 public:
  // width, height: the frame size (the viewport of mjr_render, from (0, 0)). capacity: frames the
  // PBO holds. device_index >= 0: register the PBO with that CUDA device; -1: GL only (testing on
  // machines without CUDA: frames come back through download()).
  PboReader(int64_t width, int64_t height, int64_t capacity, int64_t device_index)
      : width_(width), height_(height), capacity_(capacity), device_index_(device_index) {
    TORCH_CHECK(width > 0 && height > 0 && capacity > 0, "PboReader: sizes must be positive");
    frame_bytes_ = width * height * 3;
    const GLFunctions& f = gl();
    check_gl("(state before PboReader)");
    GLint prev = 0;
    f.GetIntegerv(kGL_PIXEL_PACK_BUFFER_BINDING, &prev);
    f.GenBuffers(1, &pbo_);
    f.BindBuffer(kGL_PIXEL_PACK_BUFFER, pbo_);
    // STREAM_COPY, not STREAM_READ: GL writes the buffer and CUDA reads it on the same GPU, and a
    // READ hint invites the driver to place it in host memory for a CPU reader that never comes.
    f.BufferData(kGL_PIXEL_PACK_BUFFER, static_cast<GLsizeiptr>(frame_bytes_ * capacity_), nullptr,
                 kGL_STREAM_COPY);
    f.BindBuffer(kGL_PIXEL_PACK_BUFFER, static_cast<GLuint>(prev));
    try {
      check_gl("glBufferData(GL_PIXEL_PACK_BUFFER) (too many or too large frames for GPU memory?)");
    } catch (...) {
      f.DeleteBuffers(1, &pbo_);
      pbo_ = 0;
      throw;
    }
    if (device_index_ >= 0) {
      c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
      cudaError_t err =
          cudaGraphicsGLRegisterBuffer(&resource_, pbo_, cudaGraphicsRegisterFlagsReadOnly);
      if (err != cudaSuccess) {
        f.DeleteBuffers(1, &pbo_);
        pbo_ = 0;
        resource_ = nullptr;
        check_cuda(err, "cudaGraphicsGLRegisterBuffer");
      }
    }
  }

  ~PboReader() {
    // Without the GL context current nothing can be freed safely; close() is the proper path.
    // Unregistering needs no GL call; the buffer itself is freed with the context. No exceptions
    // here (a destructor): the device is switched and restored by hand, errors ignored.
    if (resource_ != nullptr) {
      int previous = -1;
      bool switched = cudaGetDevice(&previous) == cudaSuccess && previous != device_index_ &&
                      cudaSetDevice(static_cast<int>(device_index_)) == cudaSuccess;
      cudaGraphicsUnregisterResource(resource_);
      if (switched) cudaSetDevice(previous);
      cudaGetLastError();
      resource_ = nullptr;
    }
  }

  // After mjr_render of one frame: resolve and read it into the PBO at `slot`.
  // fbo: MjrContext.offFBO; fbo_resolve: MjrContext.offFBO_r (0 when offSamples == 0).
  void read(int64_t fbo, int64_t fbo_resolve, int64_t slot) {
    TORCH_CHECK(pbo_ != 0, "PboReader is closed");
    TORCH_CHECK(slot >= 0 && slot < capacity_, "PboReader.read: slot ", slot, " outside [0, ",
                capacity_, ")");
    const GLFunctions& f = gl();
    // mjr_render never checks GL errors: a flag it left would otherwise be reported as ours below.
    for (int i = 0; i < 16 && f.GetError() != kGL_NO_ERROR; ++i) {
    }
    GLint prev_read_fbo = 0, prev_draw_fbo = 0, prev_pack = 0, prev_align = 4, prev_read_buf = 0;
    f.GetIntegerv(kGL_READ_FRAMEBUFFER_BINDING, &prev_read_fbo);
    f.GetIntegerv(kGL_DRAW_FRAMEBUFFER_BINDING, &prev_draw_fbo);
    f.GetIntegerv(kGL_PIXEL_PACK_BUFFER_BINDING, &prev_pack);
    f.GetIntegerv(kGL_PACK_ALIGNMENT, &prev_align);
    const GLint w = static_cast<GLint>(width_), h = static_cast<GLint>(height_);
    GLuint source = static_cast<GLuint>(fbo);
    GLenum err = kGL_NO_ERROR;
    const char* failed = nullptr;
    bool read_buffer_saved = false;
    if (fbo_resolve != 0) {  // multisampled: resolve (same blit as mjr_readPixels)
      f.BindFramebuffer(kGL_READ_FRAMEBUFFER, static_cast<GLuint>(fbo));
      f.BindFramebuffer(kGL_DRAW_FRAMEBUFFER, static_cast<GLuint>(fbo_resolve));
      f.BlitFramebuffer(0, 0, w, h, 0, 0, w, h, kGL_COLOR_BUFFER_BIT, kGL_NEAREST);
      err = f.GetError();
      failed = "glBlitFramebuffer (offFBO -> offFBO_r)";
      source = static_cast<GLuint>(fbo_resolve);
    }
    if (err == kGL_NO_ERROR) {
      f.BindFramebuffer(kGL_READ_FRAMEBUFFER, source);
      f.GetIntegerv(kGL_READ_BUFFER, &prev_read_buf);
      read_buffer_saved = true;
      f.ReadBuffer(kGL_COLOR_ATTACHMENT0);
      f.BindBuffer(kGL_PIXEL_PACK_BUFFER, pbo_);
      f.PixelStorei(kGL_PACK_ALIGNMENT, 1);  // rows of width * 3 bytes, tightly packed
      // With a pack buffer bound, the pointer argument is a byte offset into it.
      f.ReadPixels(0, 0, w, h, kGL_RGB, kGL_UNSIGNED_BYTE,
                   reinterpret_cast<void*>(static_cast<std::uintptr_t>(slot * frame_bytes_)));
      err = f.GetError();
      failed = "glReadPixels into the pack buffer";
    }
    // Restore the state MuJoCo left (it expects offFBO bound for its next draw), error or not.
    f.PixelStorei(kGL_PACK_ALIGNMENT, prev_align);
    f.BindBuffer(kGL_PIXEL_PACK_BUFFER, static_cast<GLuint>(prev_pack));
    if (read_buffer_saved) f.ReadBuffer(static_cast<GLenum>(prev_read_buf));
    f.BindFramebuffer(kGL_READ_FRAMEBUFFER, static_cast<GLuint>(prev_read_fbo));
    f.BindFramebuffer(kGL_DRAW_FRAMEBUFFER, static_cast<GLuint>(prev_draw_fbo));
    if (err != kGL_NO_ERROR) {
      for (int i = 0; i < 16 && f.GetError() != kGL_NO_ERROR; ++i) {
      }
      std::ostringstream msg;
      msg << "OpenGL error 0x" << std::hex << err << " in " << failed;
      throw std::runtime_error(msg.str());
    }
    check_gl("restoring GL state after glReadPixels");
  }

  // Copy frames [0, n) into `out` (uint8 CUDA, contiguous, [>= n, H, W, 3]) on the current stream.
  void copy_to(torch::Tensor out, int64_t n) {
    TORCH_CHECK(resource_ != nullptr, "PboReader.copy_to: not registered with CUDA (closed, or "
                                      "made with device_index=-1)");
    TORCH_CHECK(out.is_cuda() && out.scalar_type() == torch::kUInt8 && out.is_contiguous(),
                "PboReader.copy_to: out must be a contiguous uint8 CUDA tensor");
    TORCH_CHECK(out.dim() == 4 && out.size(1) == height_ && out.size(2) == width_ &&
                    out.size(3) == 3 && out.size(0) >= n,
                "PboReader.copy_to: out must be [>= n, H, W, 3] with H, W = ", height_, ", ",
                width_);
    TORCH_CHECK(n >= 0 && n <= capacity_, "PboReader.copy_to: n outside [0, capacity]");
    TORCH_CHECK(out.get_device() == device_index_, "PboReader.copy_to: out is on cuda:",
                out.get_device(), ", the buffer was registered on cuda:", device_index_);
    if (n == 0) return;
    c10::cuda::CUDAGuard guard(out.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.get_device()).stream();
    check_cuda(cudaGraphicsMapResources(1, &resource_, stream), "cudaGraphicsMapResources");
    void* ptr = nullptr;
    size_t size = 0;
    cudaError_t err = cudaGraphicsResourceGetMappedPointer(&ptr, &size, resource_);
    if (err == cudaSuccess && size < static_cast<size_t>(n * frame_bytes_)) {
      err = cudaErrorInvalidValue;
    }
    if (err == cudaSuccess) {
      err = cudaMemcpyAsync(out.data_ptr(), ptr, static_cast<size_t>(n * frame_bytes_),
                            cudaMemcpyDeviceToDevice, stream);
    }
    cudaError_t unmap = cudaGraphicsUnmapResources(1, &resource_, stream);
    check_cuda(err, "mapping the pack buffer / cudaMemcpyAsync");
    check_cuda(unmap, "cudaGraphicsUnmapResources");
  }

  // Frames [0, n) as a CPU uint8 tensor [n, H, W, 3] (rows bottom-up), read with
  // glGetBufferSubData: the GL half of the path, testable without CUDA.
  torch::Tensor download(int64_t n) {
    TORCH_CHECK(pbo_ != 0, "PboReader is closed");
    TORCH_CHECK(n >= 0 && n <= capacity_, "PboReader.download: n outside [0, capacity]");
    auto out = torch::empty({n, height_, width_, 3}, torch::kUInt8);
    if (n == 0) return out;
    const GLFunctions& f = gl();
    GLint prev = 0;
    f.GetIntegerv(kGL_PIXEL_PACK_BUFFER_BINDING, &prev);
    f.BindBuffer(kGL_PIXEL_PACK_BUFFER, pbo_);
    f.GetBufferSubData(kGL_PIXEL_PACK_BUFFER, 0, static_cast<GLsizeiptr>(n * frame_bytes_),
                       out.data_ptr());
    f.BindBuffer(kGL_PIXEL_PACK_BUFFER, static_cast<GLuint>(prev));
    check_gl("glGetBufferSubData");
    return out;
  }

  // Unregister from CUDA and delete the buffer. The GL context must be current.
  void close() {
    if (resource_ != nullptr) {
      c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
      cudaGraphicsUnregisterResource(resource_);
      resource_ = nullptr;
    }
    if (pbo_ != 0) {
      gl().DeleteBuffers(1, &pbo_);
      pbo_ = 0;
    }
  }

  int64_t width() const { return width_; }
  int64_t height() const { return height_; }
  int64_t capacity() const { return capacity_; }
  bool registered() const { return resource_ != nullptr; }

 private:
  int64_t width_, height_, capacity_, device_index_;
  int64_t frame_bytes_ = 0;
  GLuint pbo_ = 0;
  cudaGraphicsResource* resource_ = nullptr;
};

// CUDA device ordinals of the GPUs behind the current GL context (empty: none, e.g. a software
// renderer such as Mesa's llvmpipe, or a context on a GPU CUDA cannot see; cudaGLGetDevices then
// reports no device, an invalid graphics context or an operating-system error). Any other CUDA
// error is raised with its name: reported as "no device", a real fault would read as a missing GPU.
std::vector<int64_t> gl_cuda_devices() {
  unsigned int count = 0;
  int devices[16] = {0};
  cudaError_t err = cudaGLGetDevices(&count, devices, 16, cudaGLDeviceListAll);
  std::vector<int64_t> result;
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error so later calls do not report it
    if (err == cudaErrorNoDevice || err == cudaErrorInvalidGraphicsContext ||
        err == cudaErrorOperatingSystem) {
      return result;
    }
    check_cuda(err, "cudaGLGetDevices");
  }
  for (unsigned int i = 0; i < count && i < 16; ++i) result.push_back(devices[i]);
  return result;
}

void check_gl_functions() { (void)gl(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "GL -> CUDA readback of MuJoCo offscreen frames through a CUDA-registered PBO";
  pybind11::class_<PboReader>(m, "PboReader")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t>(), pybind11::arg("width"),
           pybind11::arg("height"), pybind11::arg("capacity"), pybind11::arg("device_index"))
      .def("read", &PboReader::read, pybind11::arg("fbo"), pybind11::arg("fbo_resolve"),
           pybind11::arg("slot"))
      .def("copy_to", &PboReader::copy_to, pybind11::arg("out"), pybind11::arg("n"))
      .def("download", &PboReader::download, pybind11::arg("n"))
      .def("close", &PboReader::close)
      .def_property_readonly("width", &PboReader::width)
      .def_property_readonly("height", &PboReader::height)
      .def_property_readonly("capacity", &PboReader::capacity)
      .def_property_readonly("registered", &PboReader::registered);
  m.def("gl_cuda_devices", &gl_cuda_devices,
        "CUDA ordinals of the devices behind the current GL context");
  m.def("check_gl_functions", &check_gl_functions,
        "Resolve the GL entry points through EGL (raises with the reason if that fails)");
}
