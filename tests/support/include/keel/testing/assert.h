#pragma once
// ASSERT_OK / EXPECT_OK for keel::Result, printing the error on failure.

#include <gtest/gtest.h>

#include "keel/core/result.h"

#define KEEL_TEST_RESULT_MSG(r) \
  ((r).ok() ? std::string() : std::string(keel::ErrorCodeName((r).error().code)) + ": " + (r).error().message)

#define ASSERT_OK(expr)                                        \
  do {                                                         \
    const auto& keel_r_ = (expr);                              \
    ASSERT_TRUE(keel_r_.ok()) << KEEL_TEST_RESULT_MSG(keel_r_); \
  } while (0)

#define EXPECT_OK(expr)                                        \
  do {                                                         \
    const auto& keel_r_ = (expr);                              \
    EXPECT_TRUE(keel_r_.ok()) << KEEL_TEST_RESULT_MSG(keel_r_); \
  } while (0)
