// Index builders for the GPT dataset and dataset blending (pybind11 module megatron.data._helpers).
//
// Both functions follow Megatron-LM's algorithms step for step so that the same data and seed give the
// same samples; megatron/data/helpers.py holds numpy versions that must return identical arrays.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

// The blending error w * i - used must be rounded exactly like the numpy fallback: no fused multiply-add.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace py = pybind11;

namespace {

// sample_idx[k] = (position in doc_idx, token offset) where sample k starts; sample k spans seq_length + 1
// tokens, its last token being the first of sample k + 1.
py::array_t<int32_t> build_sample_idx(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes_,
                                      py::array_t<int32_t, py::array::c_style | py::array::forcecast> doc_idx_,
                                      int32_t seq_length, int64_t num_epochs, int64_t tokens_per_epoch) {
  if (seq_length <= 0) throw std::invalid_argument("seq_length must be positive");
  const int32_t* sizes = sizes_.data();
  const int32_t* doc_idx = doc_idx_.data();
  const int64_t n_sizes = sizes_.size();
  const int64_t n_docs = doc_idx_.size();
  const int64_t num_samples = (num_epochs * tokens_per_epoch - 1) / seq_length;
  if (num_samples < 0) throw std::invalid_argument("no tokens to build samples from");

  py::array_t<int32_t> out({num_samples + 1, static_cast<int64_t>(2)});
  int32_t* sample_idx = out.mutable_data();
  {
    py::gil_scoped_release release;
    int64_t sample_index = 0;
    int64_t doc_idx_index = 0;
    int32_t doc_offset = 0;
    sample_idx[0] = 0;
    sample_idx[1] = 0;
    ++sample_index;
    while (sample_index <= num_samples) {
      int32_t remaining = seq_length + 1;
      while (remaining != 0) {
        if (doc_idx_index >= n_docs) throw std::out_of_range("doc_idx exhausted: tokens_per_epoch too large");
        const int32_t doc_id = doc_idx[doc_idx_index];
        if (doc_id < 0 || doc_id >= n_sizes) throw std::out_of_range("doc_idx entry outside sizes");
        const int32_t doc_length = sizes[doc_id] - doc_offset;
        remaining -= doc_length;
        if (remaining <= 0) {
          // The last token taken is shared with the next sample, hence the - 1.
          doc_offset += remaining + doc_length - 1;
          remaining = 0;
        } else {
          ++doc_idx_index;
          doc_offset = 0;
        }
      }
      sample_idx[2 * sample_index] = static_cast<int32_t>(doc_idx_index);
      sample_idx[2 * sample_index + 1] = doc_offset;
      ++sample_index;
    }
  }
  return out;
}

// Sample i goes to the dataset whose share lags most behind its weight (first maximum wins), and takes
// that dataset's next unused sample.
py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights_,
                                 int64_t size) {
  const int64_t num_datasets = weights_.size();
  if (num_datasets < 1 || num_datasets > 255)
    throw std::invalid_argument("blending needs 1 to 255 datasets, got " + std::to_string(num_datasets));
  if (size < 0) throw std::invalid_argument("size must be non-negative");
  const double* weights = weights_.data();
  py::array_t<uint8_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  uint8_t* di = dataset_index.mutable_data();
  int64_t* dsi = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> used(num_datasets, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double x = i > 1 ? static_cast<double>(i) : 1.0;
      int64_t best = 0;
      double best_error = weights[0] * x - static_cast<double>(used[0]);
      for (int64_t d = 1; d < num_datasets; ++d) {
        const double error = weights[d] * x - static_cast<double>(used[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      di[i] = static_cast<uint8_t>(best);
      dsi[i] = used[best];
      ++used[best];
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "C++ index builders of megatron.data (GPT sample index, blending indices)";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        py::arg("num_epochs"), py::arg("tokens_per_epoch"));
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"));
}
