#include <gtest/gtest.h>

#include "provider.h"

namespace keel::gateway::detail {
namespace {

TEST(QueryStringTest, EncodesAzureStyleParameters) {
  EXPECT_EQ(QueryString({}), "");
  EXPECT_EQ(QueryString({{"api-version", "2024-06-01"}}), "?api-version=2024-06-01");
  EXPECT_EQ(QueryString({{"a b", "x&y=z"}, {"c", "/"}}), "?a%20b=x%26y%3Dz&c=%2F");
}

}  // namespace
}  // namespace keel::gateway::detail
